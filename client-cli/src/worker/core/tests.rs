//! Deterministic tests of the worker core: build a core, feed inputs, assert the exact effects.

use super::*;

#[test]
fn recent_is_bounded() {
    let mut r = Recent::default();
    for i in 0..(RECENT_CAPACITY as u64 + 10) {
        r.insert((i, 1));
    }
    assert!(!r.contains(&(0, 1)));
    assert!(r.contains(&(RECENT_CAPACITY as u64 + 9, 1)));
    assert_eq!(r.len(), RECENT_CAPACITY);
}
