//! A patch's phase on a node: the one type, with its names, that the agent's
//! journal records, reports carry (as `pb::PatchPhase`) and the server's status
//! shows. The transitions an agent's journal allows are here too.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::pb;

/// Where a patch stands on a node. Stored by its variant name in the agent's
/// journal; shown and kept by the server under [`Phase::as_str`].
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    /// The manifest arrived and was recorded.
    Received,
    /// Signatures, expiry, target, version and local policy all passed.
    Verified,
    /// Every artifact is on disk and matches its digest.
    Downloaded,
    /// Installing has begun: a crash from here on is rolled back.
    Applying,
    /// Installed; the health check has not passed yet.
    Applied,
    /// The health check passed.
    Healthy,
    /// Done for good: the previous version's backup may go.
    Committed,
    /// A committed patch is being undone, at the server's request (an aborted
    /// rollout). Recorded before the host is touched; a crash resumes the undo.
    Reverting,
    /// Installed, then undone.
    RolledBack,
    /// Could not be carried out (download or install failed).
    Failed,
    /// Refused by a check before the host was touched.
    Rejected,
    /// Not applied, and not a failure: a newer version of its component is
    /// already installed (the patch was overtaken before it reached this host).
    Superseded,
}

impl Phase {
    /// Every phase, in order (the forward path first, then the undo of a committed
    /// patch, then the final failures).
    pub const ALL: [Phase; 12] = [
        Phase::Received,
        Phase::Verified,
        Phase::Downloaded,
        Phase::Applying,
        Phase::Applied,
        Phase::Healthy,
        Phase::Committed,
        Phase::Reverting,
        Phase::RolledBack,
        Phase::Failed,
        Phase::Rejected,
        Phase::Superseded,
    ];

    /// True for phases an entry never leaves on its own: RolledBack, Failed,
    /// Rejected and Superseded for good, and Committed unless the server asks for
    /// it to be undone (see [`Phase::may_become`]).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Committed | Self::RolledBack | Self::Failed | Self::Rejected | Self::Superseded
        )
    }

    /// The protobuf enum value reported to the server.
    pub fn to_proto(self) -> pb::PatchPhase {
        match self {
            Self::Received => pb::PatchPhase::Received,
            Self::Verified => pb::PatchPhase::Verified,
            Self::Downloaded => pb::PatchPhase::Downloaded,
            Self::Applying => pb::PatchPhase::Applying,
            Self::Applied => pb::PatchPhase::Applied,
            Self::Healthy => pb::PatchPhase::Healthy,
            Self::Committed => pb::PatchPhase::Committed,
            Self::Reverting => pb::PatchPhase::Reverting,
            Self::RolledBack => pb::PatchPhase::RolledBack,
            Self::Failed => pb::PatchPhase::Failed,
            Self::Rejected => pb::PatchPhase::Rejected,
            Self::Superseded => pb::PatchPhase::Superseded,
        }
    }

    /// Lower-case name, as the server's patch status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Verified => "verified",
            Self::Downloaded => "downloaded",
            Self::Applying => "applying",
            Self::Applied => "applied",
            Self::Healthy => "healthy",
            Self::Committed => "committed",
            Self::Reverting => "reverting",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Superseded => "superseded",
        }
    }

    /// The phase after this one on the forward path, if any.
    fn next(self) -> Option<Self> {
        match self {
            Self::Received => Some(Self::Verified),
            Self::Verified => Some(Self::Downloaded),
            Self::Downloaded => Some(Self::Applying),
            Self::Applying => Some(Self::Applied),
            Self::Applied => Some(Self::Healthy),
            Self::Healthy => Some(Self::Committed),
            _ => None,
        }
    }

    /// Whether an entry may move from `self` to `to`: one step forward, the same
    /// phase again (to update its details), or to RolledBack, Failed or Rejected,
    /// from any phase of the forward path before Committed; Superseded only
    /// before Applying (it is decided by verification, which runs again when a
    /// patch verified or downloaded earlier is offered again). Undoing a committed
    /// patch is its own path: Committed only becomes Reverting, and Reverting only
    /// RolledBack or Failed. Any other final phase never changes.
    pub fn may_become(self, to: Phase) -> bool {
        match self {
            Self::Committed => to == Self::Reverting,
            Self::Reverting => matches!(to, Self::RolledBack | Self::Failed),
            _ if self.is_final() => false,
            _ => {
                self == to
                    || self.next() == Some(to)
                    || matches!(to, Self::RolledBack | Self::Failed | Self::Rejected)
                    // Overtaken before anything on the host changed.
                    || (matches!(self, Self::Received | Self::Verified | Self::Downloaded)
                        && to == Self::Superseded)
            }
        }
    }

    /// Whether a new entry may start in `self`: Received, or refused or failed
    /// straight away.
    pub fn may_start(self) -> bool {
        matches!(self, Self::Received | Self::Rejected | Self::Failed)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Phase {
    /// The phase a report carries; None for `Unspecified`.
    pub fn from_proto(p: pb::PatchPhase) -> Option<Self> {
        Self::ALL.into_iter().find(|ph| ph.to_proto() == p)
    }

    /// The phase named `name` ([`Phase::as_str`]).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|ph| ph.as_str() == name)
    }

    /// Ended without the patch in place: RolledBack, Failed or Rejected.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::RolledBack | Self::Failed | Self::Rejected)
    }
}

impl pb::PatchPhase {
    /// The name status output and the server's records use ("unknown" for
    /// `Unspecified`).
    pub fn name(self) -> &'static str {
        Phase::from_proto(self).map_or("unknown", Phase::as_str)
    }

    /// The phase a stored name stands for (`Unspecified` for none).
    pub fn from_name(name: &str) -> Self {
        Phase::parse(name).map_or(Self::Unspecified, Phase::to_proto)
    }

    /// See [`Phase::is_final`].
    pub fn is_final(self) -> bool {
        Phase::from_proto(self).is_some_and(Phase::is_final)
    }

    /// See [`Phase::is_failure`].
    pub fn is_failure(self) -> bool {
        Phase::from_proto(self).is_some_and(Phase::is_failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_protobuf_values_go_both_ways() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
            assert_eq!(Phase::from_proto(p.to_proto()), Some(p));
            assert_eq!(pb::PatchPhase::from_name(p.as_str()), p.to_proto());
            assert_eq!(p.to_proto().name(), p.as_str());
        }
        assert_eq!(Phase::from_proto(pb::PatchPhase::Unspecified), None);
        assert_eq!(
            pb::PatchPhase::from_name("nonsense"),
            pb::PatchPhase::Unspecified
        );
        assert_eq!(pb::PatchPhase::Unspecified.name(), "unknown");
        // Every protobuf value has its phase.
        for v in 1..=i32::from(pb::PatchPhase::Superseded) {
            let p = pb::PatchPhase::try_from(v).unwrap();
            assert!(Phase::from_proto(p).is_some(), "{p:?}");
        }
    }
}
