//! A small order-preserving parallel map, and a parallel for-each over
//! owned items, for the bulk paths (bulk load, snapshot encode and decode),
//! on `std::thread::scope`: no pool, no dependency. Queries and updates
//! never use them.

/// Maps `f` over `items` on up to `available_parallelism()` threads,
/// keeping the order. Runs inline below `min_parallel` items (threads cost
/// tens of microseconds to start).
pub(crate) fn par_map<T: Sync, U: Send>(
    items: &[T],
    min_parallel: usize,
    f: impl Fn(&T) -> U + Sync,
) -> Vec<U> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if threads < 2 || items.len() < min_parallel.max(2) {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<U>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Runs `f` on every item of `items`, consuming them, on up to
/// `available_parallelism()` threads. Items are dealt round-robin, so
/// items of very different cost (shards of a dense and of a sparse cell)
/// spread evenly when they come in no particular order.
pub(crate) fn par_for_each_vec<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if threads < 2 || items.len() < 2 {
        items.into_iter().for_each(f);
        return;
    }
    let mut hands: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        hands[i % threads].push(item);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = hands
            .into_iter()
            .map(|hand| scope.spawn(move || hand.into_iter().for_each(f)))
            .collect();
        for h in handles {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_order_and_length() {
        let v: Vec<u64> = (0..100_000).collect();
        assert_eq!(
            super::par_map(&v, 1024, |x| x * 2),
            v.iter().map(|x| x * 2).collect::<Vec<_>>()
        );
        assert!(super::par_map(&[] as &[u8], 2, |x| *x).is_empty());
    }

    #[test]
    fn for_each_vec_sees_every_item_once() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let sum = AtomicU64::new(0);
        let count = AtomicU64::new(0);
        super::par_for_each_vec((1..=1000u64).collect(), |x| {
            sum.fetch_add(x, Ordering::Relaxed);
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 500_500);
        assert_eq!(count.into_inner(), 1000);
        super::par_for_each_vec(Vec::<u8>::new(), |_| unreachable!());
    }
}
