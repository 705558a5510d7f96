//! Running the device's tools (`systemctl`, `podman`, update commands): one trait, the real
//! implementation that spawns processes with a deadline, and a recording one for tests that checks
//! the exact commands an apply issues.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// Keep this much of a failing command's output for the error message.
const OUTPUT_TAIL: usize = 512;

/// A program with its arguments and a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

impl CommandLine {
    pub fn new<S: AsRef<str>>(argv: &[S], timeout: Duration) -> CommandLine {
        CommandLine {
            argv: argv.iter().map(|a| a.as_ref().to_string()).collect(),
            timeout,
        }
    }

    pub fn display(&self) -> String {
        self.argv.join(" ")
    }
}

/// Why a command failed, in one line, and whether it was stopped by a shutdown signal (SIGTERM,
/// SIGINT, SIGHUP — what systemd sends a unit's processes) rather than failing on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecError {
    pub message: String,
    pub interrupted: bool,
}

impl ExecError {
    pub fn failed(message: String) -> ExecError {
        ExecError {
            message,
            interrupted: false,
        }
    }
}

impl std::fmt::Display for ExecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ExecError> for String {
    fn from(error: ExecError) -> String {
        error.message
    }
}

/// Runs commands; an error says what failed and why, in one line.
pub trait Executor: Send + Sync {
    fn run(&self, command: &CommandLine) -> Result<(), ExecError>;
    /// Runs a query (`systemctl show`, `podman inspect`) and returns what it printed.
    fn output(&self, command: &CommandLine) -> Result<String, ExecError>;
}

/// Signals a service manager sends to stop processes: a command they end was interrupted.
const SHUTDOWN_SIGNALS: [i32; 3] = [1, 2, 15];

/// Spawns real processes (no shell), killing them at their deadline.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SystemExecutor;

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text
        .char_indices()
        .rev()
        .nth(OUTPUT_TAIL)
        .map(|(i, _)| i)
        .unwrap_or(0);
    text[start..].replace('\n', " | ")
}

impl Executor for SystemExecutor {
    fn run(&self, command: &CommandLine) -> Result<(), ExecError> {
        spawn_and_wait(command, false).map(drop)
    }

    fn output(&self, command: &CommandLine) -> Result<String, ExecError> {
        spawn_and_wait(command, true).map(|out| String::from_utf8_lossy(&out).into_owned())
    }
}

/// Reads a pipe to its end on a thread, so a chatty command cannot block on a full pipe.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buffer = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buffer);
        }
        buffer
    })
}

/// Runs `command` to its end or deadline; its standard output when `capture` asks for it.
fn spawn_and_wait(command: &CommandLine, capture: bool) -> Result<Vec<u8>, ExecError> {
    {
        use std::os::unix::process::ExitStatusExt;
        let shown = command.display();
        let (program, args) = command
            .argv
            .split_first()
            .ok_or_else(|| ExecError::failed("empty command".to_string()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(if capture {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ExecError::failed(format!("`{shown}` could not start: {e}")))?;
        let reader = drain(child.stderr.take());
        let stdout = drain(child.stdout.take());
        let deadline = Instant::now() + command.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(format!(
                        "`{shown}` timed out after {}s",
                        command.timeout.as_secs()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => break Err(format!("`{shown}`: {e}")),
            }
        };
        let output = reader.join().unwrap_or_default();
        let printed = stdout.join().unwrap_or_default();
        let status = status.map_err(ExecError::failed)?;
        if status.success() {
            return Ok(printed);
        }
        let detail = tail(&output);
        if let Some(signal) = status.signal() {
            return Err(ExecError {
                message: format!("`{shown}` was killed by signal {signal}"),
                interrupted: SHUTDOWN_SIGNALS.contains(&signal),
            });
        }
        let code = status.code().unwrap_or(-1);
        Err(ExecError::failed(if detail.is_empty() {
            format!("`{shown}` exited with {code}")
        } else {
            format!("`{shown}` exited with {code}: {detail}")
        }))
    }
}

#[cfg(test)]
pub(crate) mod recording {
    //! An executor that records what it was asked to run and fails on request.

    use super::{CommandLine, ExecError, Executor};
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct RecordingExecutor {
        pub calls: Mutex<Vec<String>>,
        /// Commands (as displayed) that fail.
        pub failing: Vec<String>,
        /// What queries print, by command (as displayed); others print nothing.
        pub outputs: std::collections::HashMap<String, String>,
    }

    impl RecordingExecutor {
        pub(crate) fn failing_on(command: &str) -> RecordingExecutor {
            RecordingExecutor {
                failing: vec![command.to_string()],
                ..Default::default()
            }
        }

        pub(crate) fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Executor for RecordingExecutor {
        fn run(&self, command: &CommandLine) -> Result<(), ExecError> {
            let shown = command.display();
            self.calls.lock().unwrap().push(shown.clone());
            if self.failing.contains(&shown) {
                Err(ExecError::failed(format!("`{shown}` exited with 1")))
            } else {
                Ok(())
            }
        }

        fn output(&self, command: &CommandLine) -> Result<String, ExecError> {
            self.run(command)?;
            Ok(self
                .outputs
                .get(&command.display())
                .cloned()
                .unwrap_or_default())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str], timeout_ms: u64) -> Result<(), String> {
        SystemExecutor
            .run(&CommandLine::new(argv, Duration::from_millis(timeout_ms)))
            .map_err(String::from)
    }

    #[test]
    fn a_command_stopped_by_a_shutdown_signal_is_interrupted_not_failed() {
        let command = CommandLine::new(&["sh", "-c", "kill -TERM $$"], Duration::from_secs(5));
        let error = SystemExecutor.run(&command).unwrap_err();
        assert!(error.interrupted, "{error}");
        assert!(error.message.contains("signal 15"), "{error}");
        let command = CommandLine::new(&["sh", "-c", "kill -SEGV $$"], Duration::from_secs(5));
        assert!(!SystemExecutor.run(&command).unwrap_err().interrupted);
    }

    #[test]
    fn runs_real_processes_and_reports_failures() {
        assert_eq!(run(&["true"], 5000), Ok(()));
        let error = run(&["sh", "-c", "echo broken >&2; exit 3"], 5000).unwrap_err();
        assert_eq!(
            error,
            "`sh -c echo broken >&2; exit 3` exited with 3: broken"
        );
        let error = run(&["/nonexistent/program"], 5000).unwrap_err();
        assert!(error.contains("could not start"), "{error}");
    }

    #[test]
    fn kills_commands_at_their_deadline() {
        let started = Instant::now();
        let error = run(&["sleep", "30"], 300).unwrap_err();
        assert!(error.contains("timed out"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
