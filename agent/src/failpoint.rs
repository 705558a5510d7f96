//! Failpoints: `FLOTILLA_AGENT_FAILPOINT=NAME` kills the agent with SIGKILL the moment it reaches
//! NAME, as a power loss would. The crash-safety tests (certificate swap, spec apply) use them to
//! stop the agent at exactly one step; unset, they cost one environment lookup.

/// Kills the process if the failpoint `name` is armed.
pub(crate) fn reached(name: &str) {
    if std::env::var("FLOTILLA_AGENT_FAILPOINT").is_ok_and(|v| v == name) {
        kill(name);
    }
}

/// Kills the process if `PREFIX:N` is armed and this is the `n`th time (counted by the caller).
pub(crate) fn reached_nth(prefix: &str, n: usize) {
    let Ok(armed) = std::env::var("FLOTILLA_AGENT_FAILPOINT") else {
        return;
    };
    if armed
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|count| count.parse::<usize>().ok())
        == Some(n)
    {
        kill(&armed);
    }
}

fn kill(name: &str) {
    tracing::warn!(failpoint = name, "failpoint reached: killing the agent");
    // SAFETY: raising a signal on our own process has no memory-safety preconditions.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
}
