//! systemd's service notifications (sd_notify(3)) for `Type=notify` units:
//! ready, stopping, and watchdog pings. Without `NOTIFY_SOCKET` in the
//! environment (not started by systemd as a notify service) every call here
//! does nothing, so the binaries behave as they do by hand.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;

/// Sends one state. A failure is logged, never fatal: the notification is a
/// report to the service manager, and the service's work matters more (a
/// missing READY=1 shows as a start timeout in `systemctl status`).
fn send(state: NotifyState<'_>) {
    if let Err(error) = sd_notify::notify(std::slice::from_ref(&state)) {
        tracing::warn!(%error, state = %state, "cannot notify systemd");
    }
}

/// `READY=1`: startup is done (the server serves; the agent's session is up).
pub fn ready() {
    send(NotifyState::Ready);
}

/// `STOPPING=1`: shutdown began, so systemd shows "deactivating" rather than
/// a service that stopped answering.
pub fn stopping() {
    send(NotifyState::Stopping);
}

/// How often to ping the watchdog: half of the `WATCHDOG_USEC` systemd set
/// (for this process, when `WATCHDOG_PID` names one), as sd_watchdog_enabled(3)
/// advises. `None` when there is no watchdog or nowhere to send pings.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    sd_notify::watchdog_enabled()
        .map(|timeout| timeout / 2)
        .filter(|interval| !interval.is_zero())
}

/// Pings the watchdog (`WATCHDOG=1`) every `interval`, each time only if
/// `alive` says true within half an interval; never returns. A probe that says
/// false or hangs skips the ping, and two skipped pings in a row run out
/// systemd's timeout: it kills the service and, with `Restart=`, starts it
/// again. The task itself runs on the service's runtime, so a runtime whose
/// threads are all blocked sends no ping either.
pub async fn watchdog<F, Fut>(interval: Duration, mut alive: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = interval / 2;
    let mut tick = tokio::time::interval(interval);
    // A runtime that stalled past a tick must not make up for it with a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::time::timeout(deadline, alive()).await {
            Ok(true) => send(NotifyState::Watchdog),
            Ok(false) => {
                tracing::warn!("not pinging the systemd watchdog: the liveness probe failed")
            }
            Err(_) => tracing::warn!(
                ?deadline,
                "not pinging the systemd watchdog: the liveness probe did not answer in time"
            ),
        }
    }
}
