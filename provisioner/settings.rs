//! What testbed takes from its environment, read once at the CLI edge
//! ([`Settings::from_env`]) and passed down with the CLI's global flags:
//! no other module reads the environment.

use std::ffi::OsString;
use std::path::PathBuf;

/// The libvirt URI when neither the topology nor `$TESTBED_LIBVIRT_URI` names one.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

/// Every setting of one command.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The image cache and the KVM probe's verdict: `$TESTBED_CACHE`, else
    /// `$XDG_CACHE_HOME/testbed`, else `~/.cache/testbed`.
    pub cache_root: PathBuf,
    /// `$TESTBED_LIBVIRT_URI`; a topology's `[libvirt] uri` wins over it.
    pub libvirt_uri: Option<String>,
    pub search: Search,
    /// `$TESTBED_GREEN_CACHE_MAX`: the green cache's size limit as written
    /// (`8GiB`; `0` saves nothing), parsed where it is used.
    pub green_cache_max: Option<String>,
    /// `--wait`: a command that finds the testbed locked waits for the lock
    /// instead of failing.
    pub wait_for_lock: bool,
}

/// Where recipes and kits are looked for besides the folders beside the
/// topology and above it.
#[derive(Debug, Clone, Default)]
pub struct Search {
    /// `$TESTBED_IMAGES`: searched first for `<name>.toml` recipes.
    pub images: Option<PathBuf>,
    /// `$TESTBED_DAEMONS`: searched first for `<name>/daemon.toml` kits.
    pub daemons: Option<PathBuf>,
}

impl Settings {
    /// The settings of this process's environment.
    pub fn from_env() -> Settings {
        Settings::from_vars(|name| std::env::var_os(name))
    }

    /// The settings given a way to read a variable (tests give their own).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Settings {
        let path = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let cache_root = path("TESTBED_CACHE").unwrap_or_else(|| {
            path("XDG_CACHE_HOME")
                .or_else(|| path("HOME").map(|home| home.join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("testbed")
        });
        Settings {
            cache_root,
            libvirt_uri: var("TESTBED_LIBVIRT_URI").and_then(|v| v.into_string().ok()),
            search: Search {
                images: path("TESTBED_IMAGES"),
                daemons: path("TESTBED_DAEMONS"),
            },
            green_cache_max: var("TESTBED_GREEN_CACHE_MAX").and_then(|v| v.into_string().ok()),
            wait_for_lock: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Settings {
        Settings::from_vars(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| OsString::from(value))
        })
    }

    #[test]
    fn the_cache_follows_testbed_cache_then_xdg_then_home() {
        assert_eq!(
            from(&[("TESTBED_CACHE", "/c"), ("HOME", "/h")]).cache_root,
            PathBuf::from("/c")
        );
        assert_eq!(
            from(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]).cache_root,
            PathBuf::from("/x/testbed")
        );
        assert_eq!(
            from(&[("HOME", "/h")]).cache_root,
            PathBuf::from("/h/.cache/testbed")
        );
    }

    #[test]
    fn search_folders_and_the_libvirt_uri_come_from_their_variables() {
        let settings = from(&[
            ("TESTBED_IMAGES", "/i"),
            ("TESTBED_DAEMONS", "/d"),
            ("TESTBED_LIBVIRT_URI", "qemu:///session"),
        ]);
        assert_eq!(settings.search.images, Some(PathBuf::from("/i")));
        assert_eq!(settings.search.daemons, Some(PathBuf::from("/d")));
        assert_eq!(settings.libvirt_uri.as_deref(), Some("qemu:///session"));
        assert!(from(&[]).search.images.is_none());
    }
}
