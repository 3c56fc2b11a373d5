//! systemd's notification protocol (`sd_notify`), without libsystemd: `READY=1` once the daemon
//! serves, `STOPPING=1` when it stops, and `WATCHDOG=1` from the tick, so a daemon whose tick
//! hangs is restarted (`WatchdogSec=` in the unit). Without `NOTIFY_SOCKET` (not under systemd,
//! or `Type=simple`) each call does nothing.

use std::time::Duration;

/// Sends `state` to systemd; false when there is no socket or it cannot be reached.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = match path.strip_prefix('@') {
        // A socket in the abstract namespace.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when systemd asked this process.
pub fn watchdog_every() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok()
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
