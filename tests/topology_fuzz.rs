//! The topology parser cannot panic: property tests (proptest) feed it the
//! shipped topologies with random edits, and random bytes, a fixed number
//! of cases each run. Every result is a topology, or an error at a real
//! position of the text (`file:line:col: error: …`), or, for a blank file,
//! an error about the whole file.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use testbed::settings::Search;
use testbed::topology::{self, TopologyError};

/// Cases per property: 7,000 edited topologies and 3,000 random inputs.
const EDITED_CASES: u32 = 7_000;
const RANDOM_CASES: u32 = 3_000;

fn topologies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies")
}

/// Every shipped topology's text: the seeds the edits start from.
fn seeds() -> Vec<String> {
    let mut seeds: Vec<String> = std::fs::read_dir(topologies_dir())
        .expect("topologies/")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .map(|path| std::fs::read_to_string(path).expect("topology"))
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 4, "the shipped topologies are the seeds");
    seeds
}

/// Pieces an edit inserts: TOML syntax, the format's own keys and values,
/// and what a hostile or careless hand types.
const PIECES: &[&str] = &[
    "\"",
    "'",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "\"\"\"",
    "[machines.x]\n",
    "[machines.zk-1]\n",
    "[networks.lan]\n",
    "[[checks]]\n",
    "[build]\n",
    "[[steps]]\n",
    "[defaults]\n",
    "ip = ",
    "ips = { lan = ",
    "memory = ",
    "cpus = ",
    "forward = [{ guest = 22, host = 2222 }]",
    "daemons = [",
    "depends_on = [\"zk-1\"]",
    "vars = { a = ",
    "subnet = ",
    "machine = ",
    "from = ",
    "tcp = { port = ",
    "http = {",
    "command = { run = ",
    "json = { \"/a\" = ",
    "retry = ",
    "timeout = ",
    "internet = ",
    "\"192.168.33.2\"",
    "\"10.0.2.15\"",
    "\"192.168.33.0/24\"",
    "\"0.0.0.0/0\"",
    "\"1GiB\"",
    "\"0MiB\"",
    "\"99999999999999999999G\"",
    "0",
    "-1",
    "65536",
    "1e400",
    "true",
    "nan",
    "\"$(touch x)\"",
    "\"`id`\"",
    "\"../../etc/passwd\"",
    "\"/etc/shadow\"",
    "\"a\\nb\"",
    "\"\\u0000\"",
    "\"é\"",
    "\u{feff}",
    "\u{202e}",
    "\r\n",
    "\t",
    "1979-05-27T07:32:00Z",
];

/// Values an edit puts after a line's `=`, so the TOML stays well formed
/// and the checks behind the syntax are reached.
const VALUES: &[&str] = &[
    "\"192.168.33.2\"",
    "\"192.168.33.255\"",
    "\"10.0.2.15\"",
    "\"300.1.1.1\"",
    "\"192.168.33.0/24\"",
    "\"10.0.2.0/24\"",
    "\"8.8.8.0/24\"",
    "\"192.168.33.1/32\"",
    "\"1GiB\"",
    "\"0MiB\"",
    "\"127M\"",
    "\"1 TiB\"",
    "\"99999999999999999999G\"",
    "0",
    "1",
    "-1",
    "65",
    "65536",
    "1024",
    "true",
    "false",
    "\"\"",
    "\"zk-1\"",
    "\"x\"",
    "\"UPPER\"",
    "\"qemu\"",
    "\"virtualbox\"",
    "\"debian-99\"",
    "[]",
    "[\"zk-1\", \"zk-1\"]",
    "{}",
    "[\"zookeeper\"]",
    "[\"nope\"]",
    "\"1s\"",
    "\"0s\"",
    "\"forever\"",
    "\"/x/\"",
    "\"/(/\"",
    "\"$(touch x)\"",
    "\"`id`\"",
    "\"../../etc/passwd\"",
    "\"/etc/shadow\"",
    "\"a\\nb\"",
    "{ port = 0 }",
    "{ port = 2181, send = \"stat\" }",
    "[{ guest = 22, host = 80 }]",
    "[{ guest = 22 }]",
    "\"host\"",
    "1.5",
    "1979-05-27",
];

/// One edit of a text, at a char boundary.
#[derive(Debug, Clone)]
enum Edit {
    Insert { at: usize, piece: usize },
    Delete { at: usize, len: usize },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Replace { at: usize, with: char },
    ReplaceValue { line: usize, value: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0..PIECES.len()).prop_map(|(at, piece)| Edit::Insert { at, piece }),
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Edit::Delete { at, len }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        (any::<usize>(), any::<char>()).prop_map(|(at, with)| Edit::Replace { at, with }),
        (any::<usize>(), 0..VALUES.len())
            .prop_map(|(line, value)| Edit::ReplaceValue { line, value }),
        (any::<usize>(), 0..VALUES.len())
            .prop_map(|(line, value)| Edit::ReplaceValue { line, value }),
    ]
}

/// The char boundary nearest below `at % (len + 1)`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &mut String, edit: &Edit) {
    match *edit {
        Edit::Insert { at, piece } => {
            let at = boundary(text, at);
            text.insert_str(at, PIECES[piece]);
        }
        Edit::Delete { at, len } => {
            let start = boundary(text, at);
            let end = boundary(text, start.saturating_add(len).min(text.len()));
            text.replace_range(start..end.max(start), "");
        }
        Edit::DuplicateLine { .. } | Edit::SwapLines { .. } if text.lines().count() == 0 => {}
        Edit::DuplicateLine { line } => {
            let mut lines: Vec<&str> = text.lines().collect();
            let line = line % lines.len();
            lines.insert(line, lines[line]);
            *text = lines.join("\n");
        }
        Edit::SwapLines { a, b } => {
            let mut lines: Vec<&str> = text.lines().collect();
            let count = lines.len();
            lines.swap(a % count, b % count);
            *text = lines.join("\n");
        }
        Edit::ReplaceValue { line, value } => {
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].contains(" = ") && !lines[i].starts_with('#'))
                .collect();
            if let Some(&i) = assignments.get(line % assignments.len().max(1)) {
                let key_end = lines[i].find(" = ").unwrap_or(0);
                lines[i] = format!("{} = {}", &lines[i][..key_end], VALUES[value]);
                *text = lines.join("\n");
            }
        }
        Edit::Replace { at, with } => {
            let start = boundary(text, at);
            if let Some(old) = text[start..].chars().next() {
                text.replace_range(start..start + old.len_utf8(), &with.to_string());
            }
        }
    }
}

/// The property: a topology, or an error placed inside `text`.
fn parses_or_points_into(text: &str) -> Result<(), TestCaseError> {
    let path = topologies_dir().join("fuzzed.toml");
    let error = match topology::parse(&path, text, &Search::default()) {
        Ok(_) => return Ok(()),
        Err(error) => error,
    };
    let message = error.to_string();
    match &error {
        TopologyError::At { line, col, .. } => {
            let lines: Vec<&str> = text.split('\n').collect();
            prop_assert!(
                *line >= 1 && *line <= lines.len(),
                "line {line} of {}: {message}",
                lines.len()
            );
            let width = lines[line - 1].chars().count();
            prop_assert!(
                *col >= 1 && *col <= width + 1,
                "col {col} of a {width}-char line: {message}"
            );
            let prefix = format!("{}:{line}:{col}: error: ", path.display());
            prop_assert!(message.starts_with(&prefix), "{message}");
            prop_assert!(message.len() > prefix.len(), "an empty message");
        }
        TopologyError::File { .. } => {
            prop_assert!(text.trim().is_empty(), "a whole-file error: {message}");
        }
        TopologyError::Io { .. } => prop_assert!(false, "parse read a file: {message}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: EDITED_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn an_edited_shipped_topology_parses_or_is_an_error_at_a_position(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let seeds = seeds();
        let mut text = seeds[seed.index(seeds.len())].clone();
        for edit in &edits {
            apply(&mut text, edit);
        }
        parses_or_points_into(&text)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: RANDOM_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_input_parses_or_is_an_error_at_a_position(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        text in "[\\[\\]{}=\",.a-z0-9 \\n#'-]{0,300}",
    ) {
        parses_or_points_into(&String::from_utf8_lossy(&bytes))?;
        parses_or_points_into(&text)?;
    }
}
