//! Rollout policies: wave sizes, failure thresholds, and how the policy given at
//! publish, a group's defaults and the server's defaults combine.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Most waves a rollout may have.
const MAX_WAVES: usize = 16;
/// Longest bake time: a week.
const MAX_BAKE_SECS: u64 = 7 * 24 * 3600;

/// A number of nodes, or a percentage of the nodes a patch targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// Parses "3" or "25%" (1..=100).
    pub fn parse(what: &str, s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || {
            Error::InvalidArgument(format!(
                "{what} {s:?}: give a node count (\"3\") or a percentage (\"25%\")"
            ))
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| bad())?;
            if !(1..=100).contains(&p) {
                return Err(Error::InvalidArgument(format!(
                    "{what} {s:?}: a percentage must be between 1% and 100%"
                )));
            }
            Ok(Self::Percent(p))
        } else {
            let n: u32 = s.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err(Error::InvalidArgument(format!(
                    "{what} {s:?}: must be at least 1"
                )));
            }
            Ok(Self::Count(n))
        }
    }

    /// How many of `n` nodes: a percentage rounds up, so "10%" of 5 is 1.
    pub fn of(self, n: usize) -> usize {
        match self {
            Self::Count(c) => (c as usize).min(n),
            Self::Percent(p) => (n * p as usize).div_ceil(100),
        }
    }

    pub fn is_all(self) -> bool {
        self == Self::Percent(100)
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(c) => write!(f, "{c}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A policy as given (at publish, or as a group's defaults): what it leaves
/// unset comes from the next level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    #[serde(default)]
    pub waves: Option<Vec<Amount>>,
    #[serde(default)]
    pub bake_secs: Option<u64>,
    #[serde(default)]
    pub max_applying: Option<u32>,
    #[serde(default)]
    pub failure_threshold: Option<Amount>,
    #[serde(default)]
    pub spread_label: Option<String>,
    /// Nodes download ahead of their install (None: where the group has
    /// maintenance windows; never in an emergency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_ahead: Option<bool>,
}

impl PolicySpec {
    /// Checks a policy as given (on the wire or a command line). Wave sizes
    /// may come as a list or as one comma-separated string ("1,10%,100%").
    pub fn parse(
        waves: &[String],
        bake_secs: Option<u64>,
        max_applying: Option<u32>,
        failure_threshold: Option<&str>,
        spread_label: Option<&str>,
    ) -> Result<Self> {
        let parts: Vec<&str> = waves
            .iter()
            .flat_map(|w| w.split(','))
            .filter(|w| !w.trim().is_empty())
            .collect();
        let waves = if parts.is_empty() {
            None
        } else {
            if parts.len() > MAX_WAVES {
                return Err(Error::InvalidArgument(format!(
                    "{} waves given; at most {MAX_WAVES}",
                    parts.len()
                )));
            }
            let waves = parts
                .iter()
                .map(|w| Amount::parse("wave", w))
                .collect::<Result<Vec<_>>>()?;
            if waves.last().is_none_or(|w| !w.is_all()) {
                return Err(Error::InvalidArgument(
                    "the last wave must be \"100%\", or the rollout would never reach every node"
                        .into(),
                ));
            }
            Some(waves)
        };
        if let Some(b) = bake_secs
            && b > MAX_BAKE_SECS
        {
            return Err(Error::InvalidArgument(format!(
                "bake time {b}s is longer than a week"
            )));
        }
        let failure_threshold = failure_threshold
            .map(|t| Amount::parse("failure threshold", t))
            .transpose()?;
        let spread_label = match spread_label.map(str::trim) {
            None | Some("") => None,
            Some(l) => {
                flotilla_proto::limits::check_name("spread label", l, 63)
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                Some(l.to_string())
            }
        };
        Ok(Self {
            waves,
            bake_secs,
            max_applying,
            failure_threshold,
            spread_label,
            download_ahead: None,
        })
    }

    /// This spec with the fields it leaves unset taken from `base`.
    pub fn over(&self, base: &PolicySpec) -> PolicySpec {
        PolicySpec {
            waves: self.waves.clone().or_else(|| base.waves.clone()),
            bake_secs: self.bake_secs.or(base.bake_secs),
            max_applying: self.max_applying.or(base.max_applying),
            failure_threshold: self.failure_threshold.or(base.failure_threshold),
            spread_label: self
                .spread_label
                .clone()
                .or_else(|| base.spread_label.clone()),
            download_ahead: self.download_ahead.or(base.download_ahead),
        }
    }
}

/// The policy in force for one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub waves: Vec<Amount>,
    pub bake: Duration,
    /// 0: no limit beyond the capacity guard.
    pub max_applying: u32,
    pub failure_threshold: Amount,
    pub spread_label: Option<String>,
}

impl Policy {
    /// The server's defaults: everything in one wave, paused by the first
    /// failure. Groups set their own canaries and bake times.
    pub fn resolve(spec: &PolicySpec) -> Self {
        Self {
            waves: spec
                .waves
                .clone()
                .unwrap_or_else(|| vec![Amount::Percent(100)]),
            bake: Duration::from_secs(spec.bake_secs.unwrap_or(0)),
            max_applying: spec.max_applying.unwrap_or(0),
            failure_threshold: spec.failure_threshold.unwrap_or(Amount::Count(1)),
            spread_label: spec.spread_label.clone(),
        }
    }

    /// An emergency: every target in one wave, no bake, no per-group limit.
    pub fn emergency(spec: &PolicySpec) -> Self {
        Self {
            waves: vec![Amount::Percent(100)],
            bake: Duration::ZERO,
            max_applying: 0,
            ..Self::resolve(spec)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waves(w: &[&str]) -> Result<PolicySpec> {
        let w: Vec<String> = w.iter().map(|s| s.to_string()).collect();
        PolicySpec::parse(&w, None, None, None, None)
    }

    #[test]
    fn amounts_parse_and_round_up() {
        assert_eq!(Amount::parse("w", "3").unwrap(), Amount::Count(3));
        assert_eq!(Amount::parse("w", " 25% ").unwrap(), Amount::Percent(25));
        assert_eq!(Amount::Percent(25).of(20), 5);
        assert_eq!(Amount::Percent(10).of(5), 1);
        assert_eq!(Amount::Percent(100).of(7), 7);
        assert_eq!(Amount::Count(3).of(2), 2);
        for bad in ["0", "0%", "101%", "-1", "x", ""] {
            assert!(Amount::parse("wave", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn waves_parse_from_a_list_or_one_string() {
        let a = waves(&["1", "25%", "100%"]).unwrap();
        let b = waves(&["1,25%,100%"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.waves.unwrap(),
            vec![Amount::Count(1), Amount::Percent(25), Amount::Percent(100)]
        );
    }

    #[test]
    fn the_last_wave_must_be_everyone() {
        let e = waves(&["1", "50%"]).unwrap_err().to_string();
        assert!(e.contains("last wave"), "{e}");
        assert!(waves(&["x", "100%"]).is_err());
        let many: Vec<&str> = std::iter::repeat_n("1", 17).chain(["100%"]).collect();
        assert!(waves(&many).is_err());
    }

    #[test]
    fn publish_spec_overrides_group_defaults() {
        let group = PolicySpec {
            waves: Some(vec![Amount::Count(1), Amount::Percent(100)]),
            bake_secs: Some(600),
            spread_label: Some("site".into()),
            ..Default::default()
        };
        let publish = PolicySpec {
            bake_secs: Some(5),
            ..Default::default()
        };
        let p = Policy::resolve(&publish.over(&group));
        assert_eq!(p.waves.len(), 2);
        assert_eq!(p.bake, Duration::from_secs(5));
        assert_eq!(p.spread_label.as_deref(), Some("site"));
        assert_eq!(p.failure_threshold, Amount::Count(1));
        let e = Policy::emergency(&publish.over(&group));
        assert_eq!(e.waves, vec![Amount::Percent(100)]);
        assert_eq!(e.bake, Duration::ZERO);
    }
}
