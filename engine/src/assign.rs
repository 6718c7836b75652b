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
    let mut solver = Solver::new(n_cols, rows);
    for s in 0..rows.len() {
        solver.augment(s);
    }
    let pairs: Vec<Option<usize>> = solver
        .row_col
        .iter()
        .map(|&c| (c < n_cols).then_some(c))
        .collect();
    let total_cost = pairs
        .iter()
        .enumerate()
        .filter_map(|(r, c)| {
            let c = (*c)?;
            solver.edges(r).filter(|e| e.0 == c).map(|e| e.1).min()
        })
        .sum::<i128>();
    let matched = pairs.iter().flatten().count();
    Assignment {
        pairs,
        matched,
        total_cost: i64::try_from(total_cost).unwrap_or(i64::MAX),
    }
}

/// The state of the shortest-augmenting-path solver. Columns `n_cols..`
/// are the rows' dummies (row r's is `n_cols + r`).
struct Solver<'a> {
    rows: &'a [Vec<(usize, i64)>],
    n_cols: usize,
    penalty: i128,
    /// Row and column duals: reduced cost `c - u[r] - v[c]` is never negative.
    u: Vec<i128>,
    v: Vec<i128>,
    col_row: Vec<Option<usize>>,
    row_col: Vec<usize>,
    // Per-augmentation scratch, reset through `touched` only.
    dist: Vec<i128>,
    prev: Vec<usize>,
    done: Vec<bool>,
    touched: Vec<usize>,
    visited_rows: Vec<(usize, i128)>,
    final_cols: Vec<(usize, i128)>,
    heap: BinaryHeap<Reverse<(i128, usize)>>,
}

impl<'a> Solver<'a> {
    fn new(n_cols: usize, rows: &'a [Vec<(usize, i64)>]) -> Self {
        let total_cols = n_cols + rows.len();
        let mut solver = Self {
            rows,
            n_cols,
            penalty: 0,
            u: vec![0; rows.len()],
            v: vec![0; total_cols],
            col_row: vec![None; total_cols],
            row_col: vec![usize::MAX; rows.len()],
            dist: vec![i128::MAX; total_cols],
            prev: vec![usize::MAX; total_cols],
            done: vec![false; total_cols],
            touched: Vec::new(),
            visited_rows: Vec::new(),
            final_cols: Vec::new(),
            heap: BinaryHeap::new(),
        };
        // Dummy cost: more than every row's costliest edge together.
        solver.penalty = 1
            + (0..rows.len())
                .map(|r| solver.edges(r).map(|e| e.1).max().unwrap_or(0))
                .sum::<i128>();
        solver
    }

    /// Row r's valid edges (in-range column, non-negative cost).
    fn edges(&self, r: usize) -> impl Iterator<Item = (usize, i128)> + 'a {
        let n_cols = self.n_cols;
        self.rows[r]
            .iter()
            .filter(move |&&(c, w)| c < n_cols && w >= 0)
            .map(|&(c, w)| (c, i128::from(w)))
    }

    fn reset(&mut self) {
        for &c in &self.touched {
            self.dist[c] = i128::MAX;
            self.done[c] = false;
        }
        self.touched.clear();
        self.visited_rows.clear();
        self.final_cols.clear();
        self.heap.clear();
    }

    /// Relaxes the edges of `row`, reached at reduced distance `row_d`.
    fn relax(&mut self, row: usize, row_d: i128) {
        let dummy = (self.n_cols + row, self.penalty);
        for (c, w) in self.edges(row).chain(std::iter::once(dummy)) {
            if self.done[c] {
                continue;
            }
            let nd = row_d + w - self.u[row] - self.v[c];
            if nd < self.dist[c] {
                if self.dist[c] == i128::MAX {
                    self.touched.push(c);
                }
                self.dist[c] = nd;
                self.prev[c] = row;
                self.heap.push(Reverse((nd, c)));
            }
        }
    }

    /// Dijkstra from row `s` to the nearest free column, then the dual
    /// update that keeps reduced costs non-negative and the flip of the path.
    fn augment(&mut self, s: usize) {
        self.reset();
        let (mut row, mut row_d) = (s, 0i128);
        self.visited_rows.push((s, 0));
        let (end, delta) = loop {
            self.relax(row, row_d);
            // The row's own dummy is always reachable and free until this
            // row takes it, so the heap never runs dry before a free column.
            let (d, c) = loop {
                let Some(Reverse((d, c))) = self.heap.pop() else {
                    unreachable!("dummy column is always free")
                };
                if !self.done[c] && d == self.dist[c] {
                    break (d, c);
                }
            };
            self.done[c] = true;
            match self.col_row[c] {
                None => break (c, d),
                Some(r) => {
                    self.final_cols.push((c, d));
                    self.visited_rows.push((r, d));
                    (row, row_d) = (r, d);
                }
            }
        };
        for &(r, d) in &self.visited_rows {
            self.u[r] += delta - d;
        }
        for &(c, d) in &self.final_cols {
            self.v[c] -= delta - d;
        }
        let mut c = end;
        loop {
            let r = self.prev[c];
            let next = self.row_col[r];
            self.row_col[r] = c;
            self.col_row[c] = Some(r);
            if r == s {
                break;
            }
            c = next;
        }
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
