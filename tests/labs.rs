//! docs/LABS.md, run: every ```console block of the lab guide is executed
//! and its output compared with what the guide says to expect, so the
//! guide cannot drift from the code.
//!
//! A block is a list of commands, each a `$ ` line (a trailing `\`
//! continues it on the next line), each followed by the output the guide
//! promises. Matching, in the style of trycmd: every expected line must
//! match the next line of output; `[..]` inside a line matches any text;
//! a line `...` matches any number of lines (also none); a line
//! `[exit: N]` says the command exits with N (otherwise it must exit 0).
//! The commands run with bash in the repository's root, with the vmlab
//! under test first in PATH, and `$LAB` a scratch directory shared by the
//! commands of one block. What a command prints on stderr is not compared
//! unless the command redirects it (`2>&1`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::run_with_deadline;

/// One command of the guide and what it must print.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    /// Where the block starts in LABS.md (1-based line).
    line: usize,
    command: String,
    expected: Vec<String>,
    status: i32,
}

/// The guide's console blocks, each a list of steps.
fn blocks(guide: &str) -> Vec<Vec<Step>> {
    let mut blocks = Vec::new();
    let mut lines = guide.lines().enumerate().peekable();
    while let Some((_, line)) = lines.next() {
        if line.trim_end() != "```console" {
            continue;
        }
        let mut steps: Vec<Step> = Vec::new();
        while let Some((n, line)) = lines.next() {
            if line.trim_end() == "```" {
                break;
            }
            if let Some(cmd) = line.strip_prefix("$ ") {
                let mut command = cmd.to_string();
                while command.ends_with('\\') {
                    command.pop();
                    match lines.next() {
                        Some((_, more)) => command.push_str(more),
                        None => break,
                    }
                }
                steps.push(Step {
                    line: n + 1,
                    command,
                    expected: Vec::new(),
                    status: 0,
                });
            } else if let Some(step) = steps.last_mut() {
                if let Some(code) = line
                    .strip_prefix("[exit: ")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    step.status = code.parse().expect("a number in [exit: N]");
                } else {
                    step.expected.push(line.to_string());
                }
            } else {
                panic!("LABS.md line {}: output before any `$ ` command", n + 1);
            }
        }
        blocks.push(steps);
    }
    blocks
}

/// Whether `line` matches `pattern` (`[..]` is any text).
fn line_matches(pattern: &str, line: &str) -> bool {
    let mut parts = pattern.split("[..]");
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// Whether `output` matches the expected lines (`...` is any lines).
fn output_matches(expected: &[String], output: &[&str]) -> bool {
    match expected.split_first() {
        None => output.is_empty(),
        Some((first, rest)) if first == "..." => {
            (0..=output.len()).any(|skip| output_matches(rest, &output[skip..]))
        }
        Some((first, rest)) => match output.split_first() {
            Some((line, more)) => line_matches(first, line) && output_matches(rest, more),
            None => false,
        },
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs one block of the guide.
fn run_block(steps: &[Step]) {
    let scratch = tempdir();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_vmlab"))
        .parent()
        .expect("the vmlab binary's directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for step in steps {
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &format!("set -o pipefail; {}", step.command)])
            .current_dir(repo())
            .env("PATH", &path)
            .env("LAB", &scratch);
        let run = run_with_deadline(cmd, Duration::from_secs(600));
        let out: Vec<&str> = run
            .stdout
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        assert_eq!(
            run.code(),
            Some(step.status),
            "LABS.md line {}: `{}` exited with {:?}, the guide says {}\n{}",
            step.line,
            step.command,
            run.code(),
            step.status,
            run.dump()
        );
        assert!(
            output_matches(&step.expected, &out),
            "LABS.md line {}: `{}` printed what the guide does not say.\n--- the guide expects ---\n{}\n{}",
            step.line,
            step.command,
            step.expected.join("\n"),
            run.dump()
        );
        eprintln!(
            "LABS.md line {}: ok ({:?}): {}",
            step.line, run.elapsed, step.command
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

fn tempdir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vmlab-labs-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("create the lab scratch directory");
    dir
}

#[test]
fn matcher() {
    assert!(line_matches("abc", "abc"));
    assert!(!line_matches("abc", "abcd"));
    assert!(line_matches("a[..]d", "abcd"));
    assert!(line_matches("[..] exits", "12 exits"));
    assert!(line_matches("x[..]y[..]z", "x1y2z"));
    assert!(!line_matches("x[..]y[..]z", "x1z"));
    let exp = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(output_matches(
        &exp(&["a", "...", "d"]),
        &["a", "b", "c", "d"]
    ));
    assert!(output_matches(&exp(&["a", "...", "d"]), &["a", "d"]));
    assert!(!output_matches(&exp(&["a", "...", "d"]), &["a", "d", "e"]));
    assert!(output_matches(&exp(&["..."]), &[]));
    assert!(!output_matches(&exp(&["a"]), &[]));
    let parsed = blocks("x\n```console\n$ echo a \\\n b\na b\n[exit: 3]\n$ true\n```\n");
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0][0].command, "echo a  b");
    assert_eq!(parsed[0][0].expected, vec!["a b"]);
    assert_eq!(parsed[0][0].status, 3);
    assert_eq!(parsed[0][1].expected, Vec::<String>::new());
}

/// Every exercise of the guide. The blocks are independent (each has a
/// `$LAB` of its own), so two run at a time: most of them boot a guest,
/// and this host has two cores.
#[test]
fn every_exercise_runs_as_the_guide_says() {
    let guide = std::fs::read_to_string(repo().join("docs/LABS.md")).expect("docs/LABS.md");
    let blocks = blocks(&guide);
    assert!(
        blocks.len() >= 8,
        "the guide has {} console blocks",
        blocks.len()
    );
    let next = AtomicUsize::new(0);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mut failed = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(block) = blocks.get(i) else { break };
                        let run = std::panic::catch_unwind(|| run_block(block));
                        if let Err(e) = run {
                            let why = e
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            failed.push(format!("block at LABS.md line {}: {why}", block[0].line));
                        }
                    }
                    failed
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|_| vec!["a worker died".into()]))
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
