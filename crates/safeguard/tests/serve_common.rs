//! Shared by the `serve_*` tests: a tiny model, and the real `safeguard serve` binary as a child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ADMIN_KEY: &str = "serve-test-admin-key";

pub fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            safeguard_gguf::write_tiny_model(&path, &safeguard_gguf::TinyConfig::with_seed(7)).expect("tiny model");
            (dir, path)
        })
        .1
}

pub struct ServeProcess {
    pub child: Child,
    pub base: String,
}

impl ServeProcess {
    /// Starts `safeguard serve` with the tiny model and the admin key on 127.0.0.1:0.
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServeProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_safeguard"));
        command
            .args(["serve", "--model"])
            .arg(tiny_model())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("SAFEGUARD_ADMIN_KEY", ADMIN_KEY)
            .env_remove("SAFEGUARD_DATABASE_URL");
        ServeProcess::spawn(command)
    }

    /// Spawns `command` (a `safeguard serve`) and waits for its "listening on" line.
    pub fn spawn(mut command: Command) -> ServeProcess {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn safeguard serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("safeguard: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(120)).expect("server did not report its address");
        ServeProcess { child, base }
    }

    /// SIGKILL on unix: no cleanup, no drain, as a crashed process.
    pub fn kill_hard(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
