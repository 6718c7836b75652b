//! Exact min-cost assignment on a sparse bipartite graph.
//!
//! Rows are orders, columns drivers, an edge is "this driver is a candidate
//! for this order" with an integer cost (pickup millimetres). The result
//! serves as many rows as any assignment of the graph can, and among those
//! has the least total cost.
//!
//! # Algorithm
//! Shortest augmenting paths with dual potentials (the Hungarian method in
//! its Jonker–Volgenant form), one Dijkstra per row over the sparse edges.
//! Each row also gets a private dummy column with a cost larger than any
//! real assignment could total, so every row is always assignable and
//! "unmatched" is just "assigned to its dummy": minimising the total then
//! maximises the number of real matches first, and the distance second.
//! Dijkstra stops at the first free column, and only touched entries are
//! reset, so an augmentation costs O(e·log e) for the e edges it reaches,
//! which is a handful when candidates are local.
//!
//! Total: O(n·E·log E) worst case for n rows and E edges; in practice
//! close to O(E·log E).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// The result of [`assign_min_cost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// For each row, its column, or `None` when the row is unserved.
    pub pairs: Vec<Option<usize>>,
    /// Number of rows served.
    pub matched: usize,
    /// Summed cost of the served rows.
    pub total_cost: i64,
}

/// Assigns at most one column to each row and at most one row to each
/// column, serving as many rows as possible at the least total cost.
///
/// `rows[i]` lists row i's candidate `(column, cost)` pairs; columns are
/// `0..n_cols`, costs must be non-negative. Out-of-range columns and
/// negative costs are ignored (they are caller bugs, not input errors).
///
/// ```
/// use hexmatch::assign_min_cost;
/// // Two orders, two drivers: greedy would give order 0 driver 0 (cost 1),
/// // leaving order 1 only driver 1 (cost 10): total 11. Optimal is 2 + 3.
/// let rows = vec![vec![(0, 1), (1, 2)], vec![(0, 3), (1, 10)]];
/// let a = assign_min_cost(2, &rows);
/// assert_eq!(a.pairs, [Some(1), Some(0)]);
/// assert_eq!(a.total_cost, 5);
/// ```
pub fn assign_min_cost(n_cols: usize, rows: &[Vec<(usize, i64)>]) -> Assignment {
    let n_rows = rows.len();
    let valid = |&&(c, w): &&(usize, i64)| c < n_cols && w >= 0;
    // Dummy cost: more than every row's costliest edge together.
    let penalty: i128 = 1 + rows
        .iter()
        .map(|r| {
            r.iter()
                .filter(valid)
                .map(|&(_, w)| i128::from(w))
                .max()
                .unwrap_or(0)
        })
        .sum::<i128>();
    let total_cols = n_cols + n_rows;
    let mut u = vec![0i128; n_rows];
    let mut v = vec![0i128; total_cols];
    let mut col_row: Vec<Option<usize>> = vec![None; total_cols];
    let mut row_col: Vec<usize> = vec![usize::MAX; n_rows];

    let mut dist = vec![i128::MAX; total_cols];
    let mut prev = vec![usize::MAX; total_cols];
    let mut done = vec![false; total_cols];
    let mut touched: Vec<usize> = Vec::new();
    let mut visited_rows: Vec<(usize, i128)> = Vec::new();
    let mut final_cols: Vec<(usize, i128)> = Vec::new();
    let mut heap: BinaryHeap<Reverse<(i128, usize)>> = BinaryHeap::new();

    for s in 0..n_rows {
        for &c in &touched {
            dist[c] = i128::MAX;
            done[c] = false;
        }
        touched.clear();
        visited_rows.clear();
        final_cols.clear();
        heap.clear();

        let (mut row, mut row_d) = (s, 0i128);
        visited_rows.push((s, 0));
        let terminal = loop {
            let dummy = n_cols + row;
            let edges = rows[row]
                .iter()
                .filter(valid)
                .map(|&(c, w)| (c, i128::from(w)));
            for (c, w) in edges.chain(std::iter::once((dummy, penalty))) {
                if done[c] {
                    continue;
                }
                let nd = row_d + w - u[row] - v[c];
                if nd < dist[c] {
                    if dist[c] == i128::MAX {
                        touched.push(c);
                    }
                    dist[c] = nd;
                    prev[c] = row;
                    heap.push(Reverse((nd, c)));
                }
            }
            // The row's own dummy is always reachable, so the heap is never
            // exhausted before a free column is found.
            let (d, c) = loop {
                let Some(Reverse((d, c))) = heap.pop() else {
                    unreachable!("dummy column is always free")
                };
                if !done[c] && d == dist[c] {
                    break (d, c);
                }
            };
            done[c] = true;
            match col_row[c] {
                None => break (c, d),
                Some(r) => {
                    final_cols.push((c, d));
                    visited_rows.push((r, d));
                    (row, row_d) = (r, d);
                }
            }
        };
        let (end, delta) = terminal;
        for &(r, d) in &visited_rows {
            u[r] += delta - d;
        }
        for &(c, d) in &final_cols {
            v[c] -= delta - d;
        }
        // Flip the alternating path back to s.
        let mut c = end;
        loop {
            let r = prev[c];
            let next = row_col[r];
            row_col[r] = c;
            col_row[c] = Some(r);
            if r == s {
                break;
            }
            c = next;
        }
    }

    let pairs: Vec<Option<usize>> = row_col.iter().map(|&c| (c < n_cols).then_some(c)).collect();
    let total_cost = pairs
        .iter()
        .enumerate()
        .filter_map(|(r, c)| {
            let c = (*c)?;
            rows[r]
                .iter()
                .filter(valid)
                .filter(|e| e.0 == c)
                .map(|e| e.1)
                .min()
        })
        .sum();
    let matched = pairs.iter().flatten().count();
    Assignment {
        pairs,
        matched,
        total_cost,
    }
}

/// Greedy nearest-first assignment: the baseline the optimum must beat.
pub fn assign_greedy(n_cols: usize, rows: &[Vec<(usize, i64)>]) -> Assignment {
    let mut edges: Vec<(i64, usize, usize)> = rows
        .iter()
        .enumerate()
        .flat_map(|(r, es)| {
            es.iter()
                .filter(|&&(c, w)| c < n_cols && w >= 0)
                .map(move |&(c, w)| (w, r, c))
        })
        .collect();
    edges.sort_unstable();
    let mut pairs = vec![None; rows.len()];
    let mut taken = vec![false; n_cols];
    let mut total_cost = 0;
    for (w, r, c) in edges {
        if pairs[r].is_none() && !taken[c] {
            pairs[r] = Some(c);
            taken[c] = true;
            total_cost += w;
        }
    }
    let matched = pairs.iter().flatten().count();
    Assignment {
        pairs,
        matched,
        total_cost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Exhaustive search: most rows served, then least cost.
    fn brute(n_cols: usize, rows: &[Vec<(usize, i64)>]) -> (usize, i64) {
        fn go(
            i: usize,
            rows: &[Vec<(usize, i64)>],
            used: &mut Vec<bool>,
            acc: (usize, i64),
            best: &mut (usize, i64),
        ) {
            if i == rows.len() {
                if acc.0 > best.0 || (acc.0 == best.0 && acc.1 < best.1) {
                    *best = acc;
                }
                return;
            }
            go(i + 1, rows, used, acc, best);
            for &(c, w) in &rows[i] {
                if !used[c] {
                    used[c] = true;
                    go(i + 1, rows, used, (acc.0 + 1, acc.1 + w), best);
                    used[c] = false;
                }
            }
        }
        let mut best = (0, 0);
        go(0, rows, &mut vec![false; n_cols], (0, 0), &mut best);
        best
    }

    fn instance() -> impl Strategy<Value = (usize, Vec<Vec<(usize, i64)>>)> {
        (1usize..7).prop_flat_map(|n_cols| {
            let row = proptest::collection::vec((0..n_cols, 0i64..1000), 0..=n_cols);
            (Just(n_cols), proptest::collection::vec(row, 0..7))
        })
    }

    fn is_valid(n_cols: usize, rows: &[Vec<(usize, i64)>], a: &Assignment) -> bool {
        let mut used = vec![false; n_cols];
        a.pairs.iter().enumerate().all(|(r, c)| match c {
            None => true,
            Some(c) => rows[r].iter().any(|e| e.0 == *c) && !std::mem::replace(&mut used[*c], true),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn optimal_equals_brute_force((n_cols, rows) in instance()) {
            let a = assign_min_cost(n_cols, &rows);
            prop_assert!(is_valid(n_cols, &rows, &a));
            prop_assert_eq!((a.matched, a.total_cost), brute(n_cols, &rows));
        }

        #[test]
        fn never_worse_than_greedy((n_cols, rows) in instance()) {
            let a = assign_min_cost(n_cols, &rows);
            let g = assign_greedy(n_cols, &rows);
            prop_assert!(is_valid(n_cols, &rows, &g));
            prop_assert!(a.matched >= g.matched);
            if a.matched == g.matched {
                prop_assert!(a.total_cost <= g.total_cost);
            }
        }
    }

    #[test]
    fn serves_more_rows_before_saving_distance() {
        // Row 0 can take col 0 (cost 10); row 1 only col 0 (cost 1) or ...
        // Serving both needs row 0 on col 1 (cost 1000).
        let rows = vec![vec![(0, 10), (1, 1000)], vec![(0, 1)]];
        let a = assign_min_cost(2, &rows);
        assert_eq!(a.pairs, [Some(1), Some(0)]);
        assert_eq!((a.matched, a.total_cost), (2, 1001));
        // A row with no candidates stays unserved; bad edges are ignored.
        let a = assign_min_cost(1, &[vec![], vec![(5, 1), (0, -1), (0, 7)]]);
        assert_eq!(a.pairs, [None, Some(0)]);
        assert_eq!(a.total_cost, 7);
    }
}
