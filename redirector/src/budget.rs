//! Counted budgets: a shared counter that grows only up to a maximum (connection budgets in
//! the proxy, the relay buffer budget).
use std::sync::atomic::{AtomicUsize, Ordering};

/// Adds `n` to `counter` unless that would take it past `max`; says whether it did.
pub fn reserve(counter: &AtomicUsize, n: usize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(n).filter(|total| *total <= max)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_stops_at_the_limit_and_frees_on_release() {
        let c = AtomicUsize::new(0);
        assert!((0..3).all(|_| reserve(&c, 1, 3)));
        assert!(!reserve(&c, 1, 3), "a fourth place under a limit of 3");
        assert_eq!(c.load(Ordering::Acquire), 3, "a refusal takes nothing");
        c.fetch_sub(1, Ordering::AcqRel);
        assert!(reserve(&c, 1, 3));
        assert!(!reserve(&c, usize::MAX, usize::MAX), "no overflow");
        let b = AtomicUsize::new(0);
        assert!(reserve(&b, 16, 32) && reserve(&b, 16, 32) && !reserve(&b, 1, 32));
    }
}
