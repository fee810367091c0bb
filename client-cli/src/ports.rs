//! Free loopback ports for local clusters (`dev up`, tests, benchmarks).
//!
//! Asking the OS for port 0 and closing the socket again is racy: Linux hands out the same
//! ephemeral ports as source ports of outgoing connections, so the port can be taken before
//! the server binds it. These ports come from below the ephemeral range instead, start at a
//! per-process random offset, are checked to be bindable, and are never handed out twice by
//! one process.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

const FIRST: u16 = 12_000;
const LAST: u16 = 32_000;

static GIVEN: Mutex<Option<(u16, HashSet<u16>)>> = Mutex::new(None);

/// A port on 127.0.0.1 that was free a moment ago and that this process has not handed out.
pub fn free_port() -> std::io::Result<u16> {
    let mut g = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (next, given) = g.get_or_insert_with(|| {
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        (FIRST + (seed % (LAST - FIRST) as u64) as u16, HashSet::new())
    });
    for _ in 0..(LAST - FIRST) {
        let port = *next;
        *next = if *next + 1 >= LAST { FIRST } else { *next + 1 };
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free port between 12000 and 32000"))
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let a: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let set: HashSet<u16> = a.iter().copied().collect();
        assert_eq!(set.len(), a.len());
        assert!(a.iter().all(|p| (FIRST..LAST).contains(p)));
        TcpListener::bind(("127.0.0.1", a[0])).unwrap();
    }
}
