//! The real binaries as child processes, for tests that kill them or read
//! their logs. Binaries come from the target directory next to the test
//! executable (`cargo build --bins` first; the README's test command does).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};

/// The target directory's binaries: beside the bench program
/// (`target/<profile>/bench`), or one up from a test (`target/<profile>/deps/`).
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary in the same target directory as this test (or
/// as the bench program).
pub fn binary(name: &str) -> PathBuf {
    let p = binary_dir().join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --bins` first",
        p.display()
    );
    p
}

/// Resident and peak resident memory of a process, in KiB.
pub fn rss_kib(pid: Option<u32>) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Lines of a child's log kept in memory (the older half is dropped past it).
const MAX_LOG_LINES: usize = 100_000;

/// A child process whose stderr lines are collected.
pub struct Proc {
    /// The child.
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `args` (`args[0]` is a workspace binary name) wrapped by `wrapper`
    /// (e.g. `ip netns exec ns`), with JSON logs.
    pub fn spawn(wrapper: &[&str], args: &[String]) -> Proc {
        let bin = binary(&args[0]);
        let mut argv: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        argv.push(bin.display().to_string());
        argv.extend(args[1..].iter().cloned());
        argv.push("--log-format=json".into());
        Self::spawn_cmd(&argv, &[])
    }

    /// Starts any program: `argv[0]` with the rest as arguments and `env`
    /// added. Its stderr lines are collected (stdout is discarded); it is
    /// killed on drop.
    ///
    /// The lines are read on a thread of their own, not on the test's
    /// runtime: a test busy moving bytes on a single-threaded runtime must
    /// not leave the child's stderr pipe full (the child would then be held
    /// back, or drop its lines, for the test's own reasons).
    pub fn spawn_cmd(argv: &[String], env: &[(&str, String)]) -> Proc {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(writer))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", argv.join(" ")));
        // The parent's copy of the writing end went with `cmd`.
        drop(cmd);
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let echo = std::env::var_os("TEST_PROC_LOGS").is_some();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(reader).lines() {
                let Ok(l) = l else { return };
                if echo {
                    eprintln!("{l}");
                }
                let mut log = sink.lock().expect("log");
                // Long-running components log without end; keep the newest.
                if log.len() >= MAX_LOG_LINES {
                    log.drain(..MAX_LOG_LINES / 2);
                }
                log.push(l);
            }
        });
        Proc { child, log }
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// The last `n` log lines, joined.
    pub fn tail(&self, n: usize) -> String {
        let l = self.log.lock().expect("log");
        l[l.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for a log line containing every one of `needles`; returns it.
    /// On timeout the panic shows the process's last lines.
    pub async fn wait_log(&self, needles: &[&str], limit: Duration) -> String {
        let what = format!("log line with {needles:?}");
        let found = crate::poll_until(limit, &what, || {
            let found = self
                .logs()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)));
            async move { found }
        })
        .await;
        found.unwrap_or_else(|e| panic!("{e}; its last lines:\n{}", self.tail(20)))
    }

    /// A field of the first JSON log line whose message is `message`.
    pub async fn log_field(&self, message: &str, field: &str) -> String {
        let line = self.wait_log(&[message], Duration::from_secs(20)).await;
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        v["fields"][field]
            .as_str()
            .unwrap_or_else(|| panic!("field {field} missing in {line}"))
            .to_string()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// Kills the process abruptly and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
