//! Cargo's build script (`build` in Cargo.toml): the recipes, kits and
//! example topologies are compiled into testbed (`library.rs`), and
//! `include_dir!` alone does not tell cargo to rebuild when one of their
//! files is added or changed. Naming the folders here does.

fn main() {
    for folder in ["images", "daemons", "topologies"] {
        println!("cargo:rerun-if-changed={folder}");
    }
}
