//! The real binaries as child processes, for tests that kill them or read
//! their logs. Binaries come from the target directory next to the test
//! executable (`cargo build --bins` first; the README's test command does).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a workspace binary in the same target directory as this test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/test-xxxx -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --bins` first",
        p.display()
    );
    p
}

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
        let mut cmd = if wrapper.is_empty() {
            Command::new(&bin)
        } else {
            let mut c = Command::new(wrapper[0]);
            c.args(&wrapper[1..]).arg(&bin);
            c
        };
        cmd.args(&args[1..])
            .arg("--log-format=json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if std::env::var_os("TEST_PROC_LOGS").is_some() {
                    eprintln!("{l}");
                }
                sink.lock().expect("log").push(l);
            }
        });
        Proc { child, log }
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// Waits for a log line containing every one of `needles`; returns it.
    pub async fn wait_log(&self, needles: &[&str], limit: Duration) -> String {
        let what = format!("log line with {needles:?}");
        crate::eventually(limit, &what, || {
            let found = self
                .logs()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)));
            async move { found }
        })
        .await
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
