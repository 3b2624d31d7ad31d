//! The subscription record, pure: what the broker must hold for us, and what it may still hold
//! that we gave up.
//!
//! `Keep::Restore` filters are recorded and made again whenever the broker may not have them:
//! after every CONNACK with `session_present = false`, after the first CONNACK of a new session
//! (claim → thing, or a restart), and for filters recorded while disconnected. `Keep::Transient`
//! filters are not recorded. An UNSUBSCRIBE that was requested but not acknowledged is "owed":
//! a resumed session still holds the filter, so it is sent again after a CONNACK with
//! `session_present = true` (AWS allows 50 subscriptions per connection; a lost UNSUBSCRIBE on
//! a persistent session would otherwise hold one for an hour). No I/O here.

use std::collections::{BTreeMap, BTreeSet};

/// Whether a subscription is recorded and restored when a session is not resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Restored after every reconnect that does not resume the session (bridge commands).
    Restore,
    /// Lives only as long as the caller needs it (a fleet-provisioning call).
    Transient,
}

/// What to send after a CONNACK.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Subscriptions {
    /// Restore filters → whether the current broker session is known to hold them.
    restore: BTreeMap<String, bool>,
    owed: BTreeSet<String>,
}

impl Subscriptions {
    /// A SUBSCRIBE for `filters` is about to be sent (or, when disconnected, wanted).
    pub fn subscribing(&mut self, filters: &[String], keep: Keep) {
        for f in filters {
            self.owed.remove(f);
            if keep == Keep::Restore {
                self.restore.entry(f.clone()).or_insert(false);
            }
        }
    }

    /// The caller's SUBACK: granted restore filters are held; a refused one is forgotten (the
    /// caller saw the refusal and decides).
    pub fn subscribed(&mut self, answers: &[(String, bool)], keep: Keep) {
        if keep != Keep::Restore {
            return;
        }
        for (f, granted) in answers {
            if *granted {
                if let Some(held) = self.restore.get_mut(f) {
                    *held = true;
                }
            } else {
                self.restore.remove(f);
            }
        }
    }

    /// An UNSUBSCRIBE for `filters` is about to be sent: they are no longer restored, and owed
    /// until the UNSUBACK.
    pub fn unsubscribing(&mut self, filters: &[String]) {
        for f in filters {
            self.restore.remove(f);
            self.owed.insert(f.clone());
        }
    }

    /// UNSUBACK for `filters`.
    pub fn unsubscribed(&mut self, filters: &[String]) {
        for f in filters {
            self.owed.remove(f);
        }
    }

    /// SUBACK for a restoring SUBSCRIBE. A refused filter stays recorded (and is tried again
    /// after the next reconnect: a policy may have been fixed meanwhile).
    pub fn restored(&mut self, filter: &str, granted: bool) {
        if let Some(held) = self.restore.get_mut(filter) {
            *held = granted;
        }
    }

    /// A new connection with its own broker session (another client id, or a restart): nothing
    /// is known to be held, and nothing owed to the old session can be paid any more.
    pub fn new_session(&mut self) {
        for held in self.restore.values_mut() {
            *held = false;
        }
        self.owed.clear();
    }

    /// CONNACK: what to subscribe and unsubscribe now.
    pub fn connack(&mut self, session_present: bool) -> Plan {
        if !session_present {
            self.new_session();
        }
        Plan {
            subscribe: self
                .restore
                .iter()
                .filter(|(_, held)| !**held)
                .map(|(f, _)| f.clone())
                .collect(),
            unsubscribe: self.owed.iter().cloned().collect(),
        }
    }

    /// The recorded restore filters.
    pub fn restore_filters(&self) -> Vec<String> {
        self.restore.keys().cloned().collect()
    }

    /// Filters whose UNSUBSCRIBE is not yet acknowledged.
    pub fn owed(&self) -> Vec<String> {
        self.owed.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn restore_filters_come_back_after_every_session_loss_transient_ones_do_not() {
        let mut r = Subscriptions::default();
        r.subscribing(&s(&["cmd/#"]), Keep::Restore);
        r.subscribing(&s(&["$aws/x/accepted"]), Keep::Transient);
        // The first CONNACK of a session, resumed or not, makes what is not known to be held.
        assert_eq!(r.connack(true).subscribe, s(&["cmd/#"]));
        r.restored("cmd/#", true);
        // Resumed: the broker still holds it.
        assert_eq!(r.connack(true), Plan::default());
        // Not resumed: made again, and again after the next loss.
        assert_eq!(r.connack(false).subscribe, s(&["cmd/#"]));
        r.restored("cmd/#", true);
        assert_eq!(r.connack(false).subscribe, s(&["cmd/#"]));
        r.restored("cmd/#", true);
        // A new session (claim → thing) starts with nothing held.
        r.new_session();
        assert_eq!(r.connack(true).subscribe, s(&["cmd/#"]));
    }

    #[test]
    fn caller_answers_and_refusals() {
        let mut r = Subscriptions::default();
        r.subscribing(&s(&["a", "b"]), Keep::Restore);
        r.subscribed(&[("a".into(), true), ("b".into(), false)], Keep::Restore);
        assert_eq!(r.restore_filters(), s(&["a"]));
        assert_eq!(r.connack(true), Plan::default());
        // Refused while restoring: kept, tried after the next reconnect.
        r.restored("a", false);
        assert_eq!(r.connack(true).subscribe, s(&["a"]));
        // Unsubscribed: no longer restored.
        r.unsubscribing(&s(&["a"]));
        assert!(r.restore_filters().is_empty());
        assert_eq!(r.connack(false).subscribe, Vec::<String>::new());
    }

    #[test]
    fn unacknowledged_unsubscribes_are_owed_to_a_resumed_session_only() {
        let mut r = Subscriptions::default();
        r.subscribing(&s(&["t/accepted", "t/rejected"]), Keep::Transient);
        r.unsubscribing(&s(&["t/accepted", "t/rejected"]));
        r.unsubscribed(&s(&["t/accepted"]));
        assert_eq!(r.owed(), s(&["t/rejected"]));
        let plan = r.connack(true);
        assert_eq!(plan.unsubscribe, s(&["t/rejected"]));
        // Still owed until its UNSUBACK.
        assert_eq!(r.connack(true).unsubscribe, s(&["t/rejected"]));
        // Subscribed again before it was paid: not owed any more.
        r.subscribing(&s(&["t/rejected"]), Keep::Transient);
        assert!(r.owed().is_empty());
        // A session that was not resumed holds nothing.
        r.unsubscribing(&s(&["t/rejected"]));
        assert_eq!(r.connack(false), Plan::default());
        assert!(r.owed().is_empty());
    }
}
