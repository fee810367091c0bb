//! Polling a condition until it holds or a deadline passes.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::Error;

/// How often [`wait_until`] and [`wait_until_blocking`] check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What a polled condition returns: `bool` (holds or not) or `Option<T>` (holds with a value).
pub trait Condition {
    /// The value a satisfied condition yields (`()` for `bool`).
    type Value;
    /// `Some` once the condition holds.
    fn satisfied(self) -> Option<Self::Value>;
}

impl Condition for bool {
    type Value = ();
    fn satisfied(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Condition for Option<T> {
    type Value = T;
    fn satisfied(self) -> Option<T> {
        self
    }
}

/// Calls `f` every [`POLL_INTERVAL`] until its future yields `true` or `Some(value)`, and
/// returns that value; [`Error::WaitTimeout`] naming `what` once `within` has passed.
///
/// The condition is always checked at least once, and once more after the deadline is
/// reached; a single check is not cut short (bound its calls with their own deadlines).
/// For a synchronous condition in async code, return `std::future::ready(..)`.
pub async fn wait_until<C, Fut, F>(
    what: &str,
    within: Duration,
    mut f: F,
) -> Result<C::Value, Error>
where
    C: Condition,
    Fut: Future<Output = C>,
    F: FnMut() -> Fut,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let late = tokio::time::Instant::now() >= deadline;
        if let Some(v) = f().await.satisfied() {
            return Ok(v);
        }
        if late {
            return Err(Error::WaitTimeout { what: what.to_string(), within });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The blocking twin of [`wait_until`] for synchronous code: sleeps the thread between
/// checks.
pub fn wait_until_blocking<C, F>(what: &str, within: Duration, mut f: F) -> Result<C::Value, Error>
where
    C: Condition,
    F: FnMut() -> C,
{
    let deadline = Instant::now() + within;
    loop {
        let late = Instant::now() >= deadline;
        if let Some(v) = f().satisfied() {
            return Ok(v);
        }
        if late {
            return Err(Error::WaitTimeout { what: what.to_string(), within });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_holds_returns_its_value() {
        let mut n = 0;
        let v = wait_until_blocking("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            (n >= 3).then_some(n)
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn a_condition_that_never_holds_times_out_naming_it() {
        let e =
            wait_until_blocking("the impossible", Duration::from_millis(50), || false).unwrap_err();
        assert!(matches!(e, Error::WaitTimeout { .. }), "{e:?}");
        assert_eq!(e.to_string(), "timed out after 50ms waiting for the impossible");
    }

    #[tokio::test]
    async fn the_async_twin_polls_futures() {
        let mut n = 0;
        wait_until("n to reach 2", Duration::from_secs(5), || {
            n += 1;
            std::future::ready(n >= 2)
        })
        .await
        .unwrap();
        assert_eq!(n, 2);
        let e = wait_until("never", Duration::ZERO, || async { None::<u8> }).await.unwrap_err();
        assert!(e.to_string().contains("waiting for never"), "{e}");
    }
}
