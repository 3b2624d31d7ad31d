//! The bounds and the overflow policy: pure, no I/O.
//!
//! The outbox holds at most `max_bytes` of live records (entries appended and not yet acknowledged
//! or dropped, counted as their encoded size on disk) and nothing older than `max_age`. When an
//! append would pass `max_bytes`, the policy decides: `drop-oldest` drops the oldest entries (of any
//! child) until the new one fits; `refuse-new` refuses it, so the endpoint can withhold the child's
//! PUBACK (MQTT 5: reason 0x97, quota exceeded) and the child keeps its data.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Make room by dropping the oldest entries (counted as `overflow` drops).
    #[default]
    DropOldest,
    /// Keep what is stored; `append` answers `OutboxError::Full`.
    RefuseNew,
}

impl fmt::Display for OverflowPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverflowPolicy::DropOldest => "drop-oldest",
            OverflowPolicy::RefuseNew => "refuse-new",
        })
    }
}

impl FromStr for OverflowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "drop-oldest" => Ok(OverflowPolicy::DropOldest),
            "refuse-new" => Ok(OverflowPolicy::RefuseNew),
            other => Err(format!(
                "unknown overflow policy `{other}` (expected drop-oldest or refuse-new)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub overflow: OverflowPolicy,
}

/// What to do with an incoming entry of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It fits.
    Admit,
    /// It fits once at least `free` bytes of the oldest entries are dropped.
    MakeRoom { free: u64 },
    /// The store is full and the policy is `refuse-new`.
    Refuse,
    /// Larger than `max_bytes` on its own: no policy can store it.
    TooLarge,
}

pub fn admit(limits: &Limits, live_bytes: u64, incoming: u64) -> Admission {
    if incoming > limits.max_bytes {
        return Admission::TooLarge;
    }
    let after = live_bytes.saturating_add(incoming);
    if after <= limits.max_bytes {
        return Admission::Admit;
    }
    match limits.overflow {
        OverflowPolicy::DropOldest => Admission::MakeRoom {
            free: after - limits.max_bytes,
        },
        OverflowPolicy::RefuseNew => Admission::Refuse,
    }
}

/// True when an entry appended at `appended_ms` is past the age bound at `now_ms`. A clock that
/// went backwards makes nothing expire.
pub fn is_expired(max_age: Duration, now_ms: u64, appended_ms: u64) -> bool {
    u128::from(now_ms.saturating_sub(appended_ms)) > max_age.as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn limits(overflow: OverflowPolicy) -> Limits {
        Limits {
            max_bytes: 1000,
            max_age: Duration::from_secs(60),
            overflow,
        }
    }

    #[test]
    fn admission_by_policy() {
        let drop = limits(OverflowPolicy::DropOldest);
        let refuse = limits(OverflowPolicy::RefuseNew);
        assert_eq!(admit(&drop, 900, 100), Admission::Admit);
        assert_eq!(admit(&drop, 950, 100), Admission::MakeRoom { free: 50 });
        assert_eq!(admit(&refuse, 900, 100), Admission::Admit);
        assert_eq!(admit(&refuse, 950, 100), Admission::Refuse);
        assert_eq!(admit(&drop, 0, 1001), Admission::TooLarge);
        assert_eq!(admit(&refuse, 0, 1001), Admission::TooLarge);
        assert_eq!(
            admit(&drop, u64::MAX, 1),
            Admission::MakeRoom {
                free: u64::MAX - 1000
            }
        );
    }

    #[test]
    fn age_bound_is_exclusive_and_ignores_a_clock_going_back() {
        let max = Duration::from_secs(60);
        assert!(!is_expired(max, 160_000, 100_000));
        assert!(is_expired(max, 160_001, 100_000));
        assert!(!is_expired(max, 1, 100_000));
    }

    #[test]
    fn policy_names() {
        assert_eq!("refuse-new".parse(), Ok(OverflowPolicy::RefuseNew));
        assert_eq!(OverflowPolicy::DropOldest.to_string(), "drop-oldest");
        assert!("drop-newest".parse::<OverflowPolicy>().is_err());
        let p: OverflowPolicy = serde_json::from_str("\"refuse-new\"").unwrap_or_default();
        assert_eq!(p, OverflowPolicy::RefuseNew);
    }
}
