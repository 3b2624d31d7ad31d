//! Admission: whether an offered child is provisioned at once or waits for an operator. Pure (no
//! I/O): the policy, the allowlist rules and the child's identity in, a decision out.

use crate::daemon::config::{Admission, AllowRule};

/// What happens to a newly offered child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Queued for provisioning.
    Queue,
    /// Waits for `gatewayctl children approve` (or `deny`).
    AwaitApproval,
}

/// The identity fields the allowlist looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity<'a> {
    pub serial: Option<&'a str>,
    pub model: Option<&'a str>,
    pub vendor: Option<&'a str>,
}

pub fn decide(policy: Admission, rules: &[AllowRule], who: Identity<'_>) -> Decision {
    match policy {
        Admission::Auto => Decision::Queue,
        Admission::Manual => Decision::AwaitApproval,
        Admission::Allowlist if rules.iter().any(|r| rule_matches(r, who)) => Decision::Queue,
        Admission::Allowlist => Decision::AwaitApproval,
    }
}

/// Every pattern the rule gives must match; a field the child lacks matches no pattern.
pub fn rule_matches(rule: &AllowRule, who: Identity<'_>) -> bool {
    let one = |pattern: &Option<String>, value: Option<&str>| match pattern {
        None => true,
        Some(p) => value.is_some_and(|v| glob(p, v)),
    };
    (rule.serial.is_some() || rule.model.is_some() || rule.vendor.is_some())
        && one(&rule.serial, who.serial)
        && one(&rule.model, who.model)
        && one(&rule.vendor, who.vendor)
}

/// `*` any run of characters (also none), `?` exactly one character; everything else literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Position of the last `*` and the text index it was tried at (classic backtracking).
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("SN-*", "SN-0042"));
        assert!(glob("SN-????", "SN-0042"));
        assert!(!glob("SN-???", "SN-0042"));
        assert!(glob("*-0042", "SN-0042"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(!glob("Acme", "acme"));
        assert!(glob("exact", "exact"));
    }

    #[test]
    fn policies_decide() {
        let rules = vec![AllowRule {
            vendor: Some("Acme*".into()),
            model: Some("M-1?".into()),
            serial: None,
        }];
        let ok = Identity {
            serial: Some("1"),
            model: Some("M-10"),
            vendor: Some("Acme Corp"),
        };
        let other = Identity {
            vendor: Some("Other"),
            ..ok
        };
        let no_model = Identity { model: None, ..ok };
        assert_eq!(decide(Admission::Allowlist, &rules, ok), Decision::Queue);
        assert_eq!(
            decide(Admission::Allowlist, &rules, other),
            Decision::AwaitApproval
        );
        assert_eq!(
            decide(Admission::Allowlist, &rules, no_model),
            Decision::AwaitApproval
        );
        assert_eq!(decide(Admission::Auto, &[], other), Decision::Queue);
        assert_eq!(
            decide(Admission::Manual, &rules, ok),
            Decision::AwaitApproval
        );
        // An empty rule matches nothing (config refuses it too).
        assert!(!rule_matches(&AllowRule::default(), ok));
    }
}
