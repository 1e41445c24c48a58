//! Which certificate renewals a node waiting for an operator's approval may
//! ask for: only of a certificate in the second half of its life, the one
//! renewal its agent needs to stay joined while it waits.

use crate::error::Error;

/// Whether a node that is not accepted yet may renew, at `now`, the
/// certificate it calls with (valid from `not_before` to `not_after`, Unix
/// seconds). Its agent renews at two thirds of the certificate's life by the
/// host's clock; from half on, the sixth between absorbs a host clock that
/// runs ahead (5 days of a 30-day certificate). Anything earlier is a node no
/// operator has vetted making the server sign, store and audit for good.
pub fn check_pending(
    node_id: &str,
    not_before: i64,
    not_after: i64,
    now: i64,
) -> Result<(), Error> {
    let due = not_before.saturating_add(not_after.saturating_sub(not_before).max(0) / 2);
    if now >= due {
        return Ok(());
    }
    let from = time::OffsetDateTime::from_unix_timestamp(due)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("Unix time {due}"));
    // FailedPrecondition: an agent retries it with backoff (it stops only
    // for PermissionDenied or Unauthenticated), so a host whose clock runs
    // far ahead renews once the server agrees it is time.
    Err(Error::FailedPrecondition(format!(
        "node {node_id} is waiting for an operator's approval: until it is accepted it may renew \
         its certificate only in the second half of the certificate's life, from {from}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_node_renews_only_from_half_its_certificates_life() {
        // A 30-day certificate: the agent renews on day 20.
        let (from, to) = (1_000_000, 1_000_000 + 30 * 86_400);
        let err = check_pending("node-a", from, to, from + 86_400)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node node-a is waiting for an operator's approval")
                && err.contains("second half of the certificate's life, from 1970-01-27T"),
            "{err}"
        );
        assert!(check_pending("node-a", from, to, from + 15 * 86_400 - 1).is_err());
        check_pending("node-a", from, to, from + 15 * 86_400).unwrap();
        check_pending("node-a", from, to, from + 20 * 86_400).unwrap();
        // Nonsense validity (ends before it starts) refuses nothing more than
        // a zero-length one would.
        check_pending("node-a", to, from, to).unwrap();
    }
}
