//! Who is active and who stands by: a pure function from a group's members and
//! their liveness to role changes, and the group status that follows. No I/O, so
//! every rule is unit-tested here.

use std::time::Duration;

use crate::model::Role;

/// One accepted node of a group, as the role assignment sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub role: Role,
    pub joined_at: i64,
    pub online: bool,
    /// How long the node has been offline; None while online.
    pub offline_for: Option<Duration>,
}

/// The rules' knobs.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// An active node offline this long is lost and may be replaced.
    pub grace: Duration,
    /// True right after a server start: nodes have not had a fair chance to
    /// reconnect yet, so nobody is declared lost.
    pub starting: bool,
}

/// Why promotions are being held back, if they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The server has just started.
    Starting,
    /// Fewer than half the group's nodes are online: that looks like a partition
    /// or an outage on our side, and promoting the rest would only churn.
    MassLoss,
}

/// Role changes for one group, and whether losses were held back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub changes: Vec<(String, Role)>,
    pub held: Option<Hold>,
}

/// Assigns roles: up to `desired` nodes are active; an active node offline past the
/// grace period is replaced by an online standby (oldest joined first); when
/// `desired` is None every node is active.
pub fn assign_roles(desired: Option<u32>, members: &[Member], policy: Policy) -> Assignment {
    let Some(desired) = desired else {
        let changes = members
            .iter()
            .filter(|m| m.role != Role::Active)
            .map(|m| (m.id.clone(), Role::Active))
            .collect();
        return Assignment {
            changes,
            held: None,
        };
    };
    let online = members.iter().filter(|m| m.online).count();
    let held = if policy.starting {
        Some(Hold::Starting)
    } else if online * 2 < members.len() {
        Some(Hold::MassLoss)
    } else {
        None
    };
    let lost = |m: &Member| {
        held.is_none() && !m.online && m.offline_for.is_some_and(|d| d >= policy.grace)
    };

    // Active nodes that keep their role: online first, then oldest.
    let mut keep: Vec<&Member> = members
        .iter()
        .filter(|m| m.role == Role::Active && !lost(m))
        .collect();
    keep.sort_by(|a, b| {
        b.online
            .cmp(&a.online)
            .then(a.joined_at.cmp(&b.joined_at))
            .then(a.id.cmp(&b.id))
    });
    keep.truncate(desired as usize);

    let mut candidates: Vec<&Member> = members
        .iter()
        .filter(|m| m.role == Role::Standby && m.online)
        .collect();
    candidates.sort_by(|a, b| a.joined_at.cmp(&b.joined_at).then(a.id.cmp(&b.id)));
    let room = (desired as usize).saturating_sub(keep.len());
    let mut active: Vec<&str> = keep.iter().map(|m| m.id.as_str()).collect();
    active.extend(candidates.iter().take(room).map(|m| m.id.as_str()));

    let changes = members
        .iter()
        .filter_map(|m| {
            let role = if active.contains(&m.id.as_str()) {
                Role::Active
            } else {
                Role::Standby
            };
            (role != m.role).then(|| (m.id.clone(), role))
        })
        .collect();
    Assignment { changes, held }
}

/// Counts for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub active: u32,
    pub healthy_active: u32,
    pub standby: u32,
    pub pending: u32,
    pub online: u32,
    pub total: u32,
}

impl Counts {
    /// desired − healthy active, never below zero; 0 without a desired count.
    pub fn deficit(&self, desired: Option<u32>) -> u32 {
        desired.map_or(0, |d| d.saturating_sub(self.healthy_active))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, role: Role, joined: i64, offline_secs: Option<u64>) -> Member {
        Member {
            id: id.into(),
            role,
            joined_at: joined,
            online: offline_secs.is_none(),
            offline_for: offline_secs.map(Duration::from_secs),
        }
    }

    const POLICY: Policy = Policy {
        grace: Duration::from_secs(30),
        starting: false,
    };

    #[test]
    fn without_desired_everyone_is_active() {
        let ms = [
            m("a", Role::Standby, 1, None),
            m("b", Role::Active, 2, None),
        ];
        let a = assign_roles(None, &ms, POLICY);
        assert_eq!(a.changes, vec![("a".to_string(), Role::Active)]);
    }

    #[test]
    fn fills_up_to_desired_oldest_first() {
        let ms = [
            m("c", Role::Standby, 3, None),
            m("a", Role::Standby, 1, None),
            m("b", Role::Standby, 2, None),
        ];
        let a = assign_roles(Some(2), &ms, POLICY);
        let mut changes = a.changes;
        changes.sort();
        assert_eq!(
            changes,
            vec![
                ("a".to_string(), Role::Active),
                ("b".to_string(), Role::Active)
            ]
        );
    }

    #[test]
    fn newcomer_beyond_desired_stands_by() {
        let ms = [
            m("a", Role::Active, 1, None),
            m("b", Role::Active, 2, None),
            m("c", Role::Standby, 3, None),
        ];
        assert!(assign_roles(Some(2), &ms, POLICY).changes.is_empty());
    }

    #[test]
    fn lost_active_is_replaced_only_after_grace() {
        let within = [
            m("a", Role::Active, 1, Some(10)),
            m("b", Role::Active, 2, None),
            m("c", Role::Standby, 3, None),
        ];
        assert!(assign_roles(Some(2), &within, POLICY).changes.is_empty());
        let past = [
            m("a", Role::Active, 1, Some(31)),
            m("b", Role::Active, 2, None),
            m("c", Role::Standby, 3, None),
        ];
        let mut changes = assign_roles(Some(2), &past, POLICY).changes;
        changes.sort();
        assert_eq!(
            changes,
            vec![
                ("a".to_string(), Role::Standby),
                ("c".to_string(), Role::Active)
            ]
        );
    }

    #[test]
    fn nothing_is_lost_while_starting() {
        let ms = [
            m("a", Role::Active, 1, Some(300)),
            m("b", Role::Standby, 2, None),
        ];
        let a = assign_roles(
            Some(1),
            &ms,
            Policy {
                starting: true,
                ..POLICY
            },
        );
        assert!(a.changes.is_empty());
        assert_eq!(a.held, Some(Hold::Starting));
    }

    #[test]
    fn mass_loss_holds_promotions() {
        // 3 of 4 gone at once: a partition, not three dead hosts.
        let ms = [
            m("a", Role::Active, 1, Some(300)),
            m("b", Role::Active, 2, Some(300)),
            m("c", Role::Standby, 3, Some(300)),
            m("d", Role::Standby, 4, None),
        ];
        let a = assign_roles(Some(2), &ms, POLICY);
        assert!(a.changes.is_empty());
        assert_eq!(a.held, Some(Hold::MassLoss));
    }

    #[test]
    fn lowering_desired_demotes_offline_then_newest() {
        let ms = [
            m("a", Role::Active, 1, None),
            m("b", Role::Active, 2, Some(5)),
            m("c", Role::Active, 3, None),
            m("d", Role::Active, 4, None),
        ];
        let mut changes = assign_roles(Some(2), &ms, POLICY).changes;
        changes.sort();
        assert_eq!(
            changes,
            vec![
                ("b".to_string(), Role::Standby),
                ("d".to_string(), Role::Standby)
            ]
        );
    }

    #[test]
    fn deficit_counts_only_healthy_active() {
        let c = Counts {
            active: 3,
            healthy_active: 2,
            ..Counts::default()
        };
        assert_eq!(c.deficit(Some(5)), 3);
        assert_eq!(c.deficit(Some(1)), 0);
        assert_eq!(c.deficit(None), 0);
    }
}
