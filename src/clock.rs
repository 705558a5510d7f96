//! The one place that reads the wall clock (clippy.toml bans reading it anywhere else): instants
//! as Unix milliseconds (how the store keeps them) and protobuf Timestamps (how the protocol
//! carries them). Durations and deadlines use `tokio::time::Instant`, which tests can pause.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
#[allow(clippy::disallowed_methods)]
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where the hub, the control plane, the CA and the auth layer read the time: the system's wall
/// clock; one that keeps step with tokio's (under `tokio::time::pause` it stands still until the
/// test advances it); or the system's plus an offset a test moves forward. So certificate expiry,
/// renewal windows and waves are tested in virtual time, without sleeping.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    source: Source,
}

#[derive(Debug, Clone, Default)]
enum Source {
    #[default]
    System,
    /// What the clock read at the tokio instant given.
    Tokio(i64, tokio::time::Instant),
    /// The system clock plus this many milliseconds.
    Offset(Arc<AtomicI64>),
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `start_ms` now and then moves exactly as tokio's clock does.
    pub fn following_tokio(start_ms: i64) -> Clock {
        Clock {
            source: Source::Tokio(start_ms, tokio::time::Instant::now()),
        }
    }

    /// The system clock, which `advance` moves ahead (for tests that cannot pause tokio's clock,
    /// such as those talking over real sockets). Clones share the offset.
    pub fn adjustable() -> Clock {
        Clock {
            source: Source::Offset(Arc::default()),
        }
    }

    /// Moves an adjustable clock ahead by `by`; other clocks cannot be moved and are left alone.
    pub fn advance(&self, by: std::time::Duration) {
        if let Source::Offset(offset) = &self.source {
            let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
            offset.fetch_add(by, Ordering::Relaxed);
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_millis(&self) -> i64 {
        match &self.source {
            Source::System => now_millis(),
            Source::Tokio(start_ms, at) => {
                let elapsed = i64::try_from(at.elapsed().as_millis()).unwrap_or(i64::MAX);
                start_ms.saturating_add(elapsed)
            }
            Source::Offset(offset) => now_millis().saturating_add(offset.load(Ordering::Relaxed)),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn now_secs(&self) -> i64 {
        self.now_millis().div_euclid(1000)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    now_millis().div_euclid(1000)
}

/// A protobuf Timestamp of Unix milliseconds.
pub fn timestamp_from_millis(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf Timestamp of Unix seconds.
pub fn timestamp_from_secs(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

/// Parses `90s`, `15m`, `12h`, `365d` (a bare number is seconds) into a positive duration.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 12h or 365d"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use s, m, h or d"
            ));
        }
    };
    if seconds == 0 {
        return Err("a duration must be positive".into());
    }
    Ok(std::time::Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_clock_following_tokio_moves_only_when_tokio_time_does() {
        let clock = Clock::following_tokio(1_000_000);
        assert_eq!(clock.now_millis(), 1_000_000);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_millis(), 1_000_000 + 3_600_000);
        let system = Clock::system().now_millis();
        assert!(system > 1_700_000_000_000, "the system clock reads today");
    }

    #[test]
    fn an_adjustable_clock_runs_ahead_by_what_it_was_advanced_and_clones_share_it() {
        let clock = Clock::adjustable();
        let copy = clock.clone();
        let before = now_millis();
        clock.advance(Duration::from_secs(86_400));
        let read = copy.now_millis();
        assert!(read >= before + 86_400_000, "{read} vs {before}");
        assert!(read < now_millis() + 86_400_000 + 1000);
        let system = Clock::system();
        system.advance(Duration::from_secs(60));
        assert!(
            system.now_millis() <= now_millis(),
            "the system clock does not move"
        );
    }

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
    }
}
