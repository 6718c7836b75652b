//! A small order-preserving parallel map for the bulk paths (bulk load,
//! snapshot encode and decode), on `std::thread::scope`: no pool, no
//! dependency. Queries and updates never use it.

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
}
