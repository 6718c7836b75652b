//! The R-tree of one shard's available drivers.
//!
//! A point R-tree on the drivers' unit vectors, built for what a shard
//! does most: move one driver a few metres. It replaced an `rstar` tree
//! whose R* insertion (`choose_subtree`'s overlap sums, forced
//! reinsertion) and descent-based removal were three quarters of a move
//! (measured by callgrind at `137bf1c`, which brought this tree in);
//! `rstar` still holds the small top-level tree of cells, which changes
//! only when a cell gets its first driver.
//!
//! # Layout
//! - Nodes live in two arenas, leaves and inner nodes, and refer to each
//!   other by index. A leaf holds up to [`M`] items inline; an inner node
//!   holds up to [`M`] children **and their boxes**, so a search reads one
//!   node to rank all of its children.
//! - Beside each child's box, an inner node holds the child's **filter
//!   summary**: the union of the [`Traits`] (vehicle class and
//!   capabilities) of every item below it. A search skips a child whose
//!   summary lacks an attribute its filter requires, so a rare filter
//!   opens few nodes and a filter nobody matches opens none.
//! - `leaf_of[slot]` is the leaf holding the item of that slot: a move or
//!   removal finds its item with no descent.
//!
//! # Invariants (checked by `check` in the tests)
//! - Every box in an inner node contains every point below that child
//!   (boxes may be loose, never short); `root_box` contains every point.
//! - Every summary in an inner node is exactly the union of the traits of
//!   the items below that child; `root_traits` is that of every item.
//! - Every node but the root has between 1 and [`M`] entries; leaves below
//!   [`MIN_LEAF`] after a removal are dissolved and their items reinserted.
//! - All leaves are at the same depth (`height` levels below the root).
//! - `leaf_of` and the nodes' `parent` links agree with the arenas.
//!
//! # Algorithms
//! Insertion descends by least box enlargement (volume, then margin, then
//! the smaller box), adding the item's traits to each summary on the way;
//! an overflowing node splits R*-style (the axis of least total margin,
//! then the cut of least overlap), and each half's summary is the union of
//! its entries. A move that stays inside its leaf's box, its traits
//! unchanged, rewrites the item in place (no box or summary changes); any
//! other update is a removal and an insertion. A removal recomputes the
//! box and the summary of each node above the item, from that node's own
//! entries, up to the first node where neither changes: summaries are
//! never left loose (a union of at most [`M`] entries costs a few
//! instructions per level). Bulk loading partitions k-d style, always
//! cutting the longest axis, into nodes filled to [`BULK_FILL`].

use crate::filter::{Combinations, Traits};

/// Most entries of a node.
pub(crate) const M: usize = 16;
/// A leaf left with fewer items than this by a removal is dissolved.
const MIN_LEAF: usize = 4;
/// The smallest side of a split.
const MIN_SPLIT: usize = 6;
/// Entries per node in a bulk load: room for a few insertions before the
/// first split.
const BULK_FILL: usize = 14;
/// No node / not in the tree.
const NONE: u32 = u32::MAX;

/// A point in the tree: an available driver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Item {
    /// The driver's position as a unit vector.
    pub(crate) v: [f64; 3],
    /// Its slot in the shard.
    pub(crate) slot: u32,
    /// Its vehicle class and capabilities.
    pub(crate) traits: Traits,
}

const NO_ITEM: Item = Item {
    v: [0.0; 3],
    slot: NONE,
    traits: Traits::NONE,
};

/// The union of the items' traits.
fn traits_of_items(items: &[Item]) -> Traits {
    items.iter().fold(Traits::NONE, |t, it| t.union(it.traits))
}

/// The union of the summaries.
fn traits_of(summaries: &[Traits]) -> Traits {
    summaries.iter().fold(Traits::NONE, |t, s| t.union(*s))
}

/// An axis-aligned box in 3D.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Aabb {
    pub(crate) lo: [f64; 3],
    pub(crate) hi: [f64; 3],
}

impl Aabb {
    /// Contains nothing; grows into the first point merged into it.
    const EMPTY: Self = Self {
        lo: [f64::INFINITY; 3],
        hi: [f64::NEG_INFINITY; 3],
    };

    fn point(v: [f64; 3]) -> Self {
        Self { lo: v, hi: v }
    }

    #[inline]
    fn contains(&self, v: &[f64; 3]) -> bool {
        (0..3).all(|i| self.lo[i] <= v[i] && v[i] <= self.hi[i])
    }

    #[inline]
    fn grow(&mut self, v: &[f64; 3]) {
        for ((lo, hi), x) in self.lo.iter_mut().zip(&mut self.hi).zip(v) {
            *lo = lo.min(*x);
            *hi = hi.max(*x);
        }
    }

    fn merge(&mut self, b: &Self) {
        for i in 0..3 {
            self.lo[i] = self.lo[i].min(b.lo[i]);
            self.hi[i] = self.hi[i].max(b.hi[i]);
        }
    }

    fn merged(mut self, b: &Self) -> Self {
        self.merge(b);
        self
    }

    fn extent(&self, i: usize) -> f64 {
        (self.hi[i] - self.lo[i]).max(0.0)
    }

    fn volume(&self) -> f64 {
        self.extent(0) * self.extent(1) * self.extent(2)
    }

    fn margin(&self) -> f64 {
        self.extent(0) + self.extent(1) + self.extent(2)
    }

    fn center(&self, i: usize) -> f64 {
        0.5 * (self.lo[i] + self.hi[i])
    }

    fn overlap(&self, b: &Self) -> f64 {
        (0..3)
            .map(|i| (self.hi[i].min(b.hi[i]) - self.lo[i].max(b.lo[i])).max(0.0))
            .product()
    }

    /// The squared distance from `q` to the nearest point of the box (0
    /// inside it).
    #[inline]
    pub(crate) fn d2(&self, q: &[f64; 3]) -> f64 {
        let mut s = 0.0;
        for ((lo, hi), x) in self.lo.iter().zip(&self.hi).zip(q) {
            let below = lo - x;
            let above = x - hi;
            // Plain comparisons, not `f64::max` (which pays for NaN
            // rules that finite boxes never need): one `maxsd` each.
            let d = if below > above { below } else { above };
            let d = if d > 0.0 { d } else { 0.0 };
            s += d * d;
        }
        s
    }

    fn of_items(items: &[Item]) -> Self {
        let mut b = Self::EMPTY;
        for it in items {
            b.grow(&it.v);
        }
        b
    }

    fn of_boxes(boxes: &[Aabb]) -> Self {
        boxes.iter().fold(Self::EMPTY, Aabb::merged)
    }
}

#[derive(Debug, Clone)]
struct Leaf {
    parent: u32,
    len: u8,
    items: [Item; M],
}

impl Leaf {
    fn items(&self) -> &[Item] {
        &self.items[..usize::from(self.len)]
    }
}

#[derive(Debug, Clone)]
struct Inner {
    parent: u32,
    len: u8,
    /// 1: the children are leaves; otherwise inner nodes one lower.
    height: u8,
    boxes: [Aabb; M],
    /// The filter summary of each child.
    traits: [Traits; M],
    children: [u32; M],
}

/// A node of the tree, for a walk: a leaf or an inner node, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeRef {
    /// A leaf: read its items with [`ShardTree::items`].
    Leaf(u32),
    /// An inner node: read its children with [`ShardTree::children`].
    Inner(u32),
}

/// The children of an inner node, for a walk: entry `i` is child
/// `nodes[i]` (a leaf if `leaves`), its box `boxes[i]` and its filter
/// summary `traits[i]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Children<'a> {
    /// Whether the children are leaves (else inner nodes).
    pub(crate) leaves: bool,
    pub(crate) nodes: &'a [u32],
    pub(crate) boxes: &'a [Aabb],
    pub(crate) traits: &'a [Traits],
}

impl Children<'_> {
    /// Child `i` as a node reference.
    #[inline]
    pub(crate) fn node(&self, i: usize) -> NodeRef {
        if self.leaves {
            NodeRef::Leaf(self.nodes[i])
        } else {
            NodeRef::Inner(self.nodes[i])
        }
    }
}

/// The R-tree of one shard (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct ShardTree {
    leaves: Vec<Leaf>,
    inners: Vec<Inner>,
    free_leaves: Vec<u32>,
    free_inners: Vec<u32>,
    root: u32,
    /// 0: the root is a leaf.
    height: u8,
    root_box: Aabb,
    /// The union of every item's traits.
    root_traits: Traits,
    /// How many items have each combination of traits.
    combos: Combinations,
    /// slot → the leaf holding its item, or `NONE`.
    leaf_of: Vec<u32>,
    len: usize,
}

impl Default for ShardTree {
    fn default() -> Self {
        Self {
            leaves: vec![Leaf {
                parent: NONE,
                len: 0,
                items: [NO_ITEM; M],
            }],
            inners: Vec::new(),
            free_leaves: Vec::new(),
            free_inners: Vec::new(),
            root: 0,
            height: 0,
            root_box: Aabb::EMPTY,
            root_traits: Traits::NONE,
            combos: Combinations::default(),
            leaf_of: Vec::new(),
            len: 0,
        }
    }
}

/// An entry of an inner node being split: a child and its box.
#[derive(Debug, Clone, Copy)]
struct Entry {
    bbox: Aabb,
    traits: Traits,
    child: u32,
}

impl ShardTree {
    /// Number of items.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Leaves and inner nodes allocated, free ones included.
    #[cfg(test)]
    pub(crate) fn nodes_allocated(&self) -> usize {
        self.leaves.capacity() + self.inners.capacity()
    }

    /// The root and a box containing every item (empty when there are none).
    pub(crate) fn root(&self) -> (NodeRef, Aabb) {
        let node = if self.height == 0 {
            NodeRef::Leaf(self.root)
        } else {
            NodeRef::Inner(self.root)
        };
        (node, self.root_box)
    }

    /// The union of every item's traits (empty when there are none).
    pub(crate) fn traits(&self) -> Traits {
        self.root_traits
    }

    /// How many items have each combination of traits.
    pub(crate) fn combinations(&self) -> &Combinations {
        &self.combos
    }

    /// Whether a combination of traits appeared or went since the flag
    /// was last cleared (or since a bulk load, if it had items).
    #[inline]
    pub(crate) fn combinations_changed(&self) -> bool {
        self.combos.changed()
    }

    /// Clears [`ShardTree::combinations_changed`].
    pub(crate) fn clear_combinations_changed(&mut self) {
        self.combos.clear_changed();
    }

    /// The items of a leaf.
    #[inline]
    pub(crate) fn items(&self, leaf: u32) -> &[Item] {
        self.leaves[leaf as usize].items()
    }

    /// The children of an inner node, with their boxes and summaries.
    #[inline]
    pub(crate) fn children(&self, inner: u32) -> Children<'_> {
        let n = &self.inners[inner as usize];
        let len = usize::from(n.len);
        Children {
            leaves: n.height == 1,
            nodes: &n.children[..len],
            boxes: &n.boxes[..len],
            traits: &n.traits[..len],
        }
    }

    /// Every item, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Item> {
        // Freed leaves have no items, so the arena can be read whole.
        self.leaves.iter().flat_map(Leaf::items)
    }

    /// The item of `slot`, if it is in the tree.
    #[cfg(test)]
    pub(crate) fn get(&self, slot: u32) -> Option<&Item> {
        let leaf = self.leaf_holding(slot)?;
        self.items(leaf).iter().find(|it| it.slot == slot)
    }

    /// Whether the item of `slot` is in the tree.
    pub(crate) fn holds(&self, slot: u32) -> bool {
        self.leaf_holding(slot).is_some()
    }

    /// Adds many items (their slots distinct and not in the tree): by
    /// rebuilding the tree with bulk loading when they are at least a
    /// quarter of what it holds (an empty tree's first drivers, a
    /// takeover's), else one by one.
    pub(crate) fn extend(&mut self, items: Vec<Item>) {
        if items.len() * 4 < self.len {
            for item in items {
                self.insert(item);
            }
            return;
        }
        let mut all = items;
        all.extend(self.iter().copied());
        *self = Self::bulk_load(all);
    }

    /// The leaf holding the item of `slot`, if it is in the tree.
    fn leaf_holding(&self, slot: u32) -> Option<u32> {
        self.leaf_of
            .get(slot as usize)
            .copied()
            .filter(|&leaf| leaf != NONE)
    }

    /// Builds a tree of `items` (whose slots must be distinct) at once.
    pub(crate) fn bulk_load(mut items: Vec<Item>) -> Self {
        let mut t = Self {
            leaves: Vec::with_capacity(items.len() / (BULK_FILL - 2) + 1),
            ..Self::default()
        };
        let max_slot = items.iter().map(|it| it.slot as usize + 1).max();
        t.leaf_of = vec![NONE; max_slot.unwrap_or(0)];
        t.len = items.len();
        t.combos = Combinations::of(items.iter().map(|it| it.traits));
        let mut height = 0u8;
        let mut cap = BULK_FILL;
        while cap < items.len() {
            cap = cap.saturating_mul(BULK_FILL);
            height += 1;
        }
        let (root, bbox, traits) = t.build(&mut items, height, NONE);
        t.root = root;
        t.height = height;
        t.root_box = bbox;
        t.root_traits = traits;
        t
    }

    /// Builds the subtree of `items` at `height`; returns it, its box and
    /// its summary.
    fn build(&mut self, items: &mut [Item], height: u8, parent: u32) -> (u32, Aabb, Traits) {
        if height == 0 {
            let idx = self.leaves.len() as u32;
            let mut leaf = Leaf {
                parent,
                len: items.len() as u8,
                items: [NO_ITEM; M],
            };
            leaf.items[..items.len()].copy_from_slice(items);
            for it in &*items {
                self.leaf_of[it.slot as usize] = idx;
            }
            self.leaves.push(leaf);
            return (idx, Aabb::of_items(items), traits_of_items(items));
        }
        let cap = BULK_FILL.pow(u32::from(height));
        let groups = items.len().div_ceil(cap);
        let idx = self.inners.len() as u32;
        self.inners.push(Inner {
            parent,
            len: 0,
            height,
            boxes: [Aabb::EMPTY; M],
            traits: [Traits::NONE; M],
            children: [NONE; M],
        });
        let mut bounds = Vec::with_capacity(groups + 1);
        bounds.push(0);
        kd_partition(items, Aabb::of_items(items), 0, groups, &mut bounds);
        let mut bbox = Aabb::EMPTY;
        let mut traits = Traits::NONE;
        for w in bounds.windows(2) {
            let (child, b, t) = self.build(&mut items[w[0]..w[1]], height - 1, idx);
            let n = &mut self.inners[idx as usize];
            let at = usize::from(n.len);
            n.children[at] = child;
            n.boxes[at] = b;
            n.traits[at] = t;
            n.len += 1;
            bbox.merge(&b);
            traits = traits.union(t);
        }
        (idx, bbox, traits)
    }

    /// Adds an item; its slot must not be in the tree.
    pub(crate) fn insert(&mut self, item: Item) {
        self.combos.add(item.traits);
        self.len += 1;
        self.place(item);
    }

    /// Puts an item where insertion's descent leads (the item count is
    /// the caller's to keep).
    fn place(&mut self, item: Item) {
        let slot = item.slot as usize;
        if self.leaf_of.len() <= slot {
            self.leaf_of.resize(slot + 1, NONE);
        }
        self.root_box.grow(&item.v);
        self.root_traits = self.root_traits.union(item.traits);
        let mut node = self.root;
        for _ in 0..self.height {
            let n = &mut self.inners[node as usize];
            let i = choose_child(&n.boxes[..usize::from(n.len)], &item.v);
            n.boxes[i].grow(&item.v);
            n.traits[i] = n.traits[i].union(item.traits);
            node = n.children[i];
        }
        self.push_item(node, item);
    }

    /// Removes the item of `slot`; returns its traits, or `None` if it is
    /// not in the tree.
    pub(crate) fn remove(&mut self, slot: u32) -> Option<Traits> {
        let traits = self.take_item(slot)?;
        self.combos.remove(traits);
        Some(traits)
    }

    /// Removes the item of `slot` from the nodes (the combinations are
    /// the caller's to keep).
    fn take_item(&mut self, slot: u32) -> Option<Traits> {
        let leaf = self.leaf_holding(slot)?;
        let l = &mut self.leaves[leaf as usize];
        let len = usize::from(l.len);
        let at = l.items[..len].iter().position(|it| it.slot == slot)?;
        self.leaf_of[slot as usize] = NONE;
        self.len -= 1;
        let traits = l.items[at].traits;
        l.items[at] = l.items[len - 1];
        l.len -= 1;
        if leaf != self.root && usize::from(l.len) < MIN_LEAF {
            let mut orphans = [NO_ITEM; MIN_LEAF];
            let n = usize::from(l.len);
            orphans[..n].copy_from_slice(l.items());
            self.detach(leaf, 0);
            for it in &orphans[..n] {
                self.place(*it);
            }
        } else {
            self.shrink_up(leaf, 0);
        }
        if self.len == 0 {
            // Empty: give the node arenas and the slot table back.
            *self = Self {
                combos: std::mem::take(&mut self.combos),
                ..Self::default()
            };
        }
        Some(traits)
    }

    /// Replaces the item of `item.slot` with `item`: in place when its
    /// leaf's box holds the new point and its traits are unchanged, else
    /// by a removal and an insertion (only an insertion if the slot is not
    /// in the tree).
    pub(crate) fn update(&mut self, item: Item) {
        let slot = item.slot;
        let Some(leaf) = self.leaf_holding(slot) else {
            return self.insert(item);
        };
        let inside = match self.parent_slot(leaf, 0) {
            Some((p, i)) => self.inners[p as usize].boxes[i].contains(&item.v),
            None => self.root_box.contains(&item.v),
        };
        if inside {
            let l = &mut self.leaves[leaf as usize];
            let len = usize::from(l.len);
            if let Some(it) = l.items[..len]
                .iter_mut()
                .find(|it| it.slot == slot && it.traits == item.traits)
            {
                *it = item;
                return;
            }
        }
        match self.take_item(slot) {
            // Same traits: the combinations stay as they are.
            Some(old) if old == item.traits => {
                self.len += 1;
                self.place(item);
            }
            Some(old) => {
                self.combos.remove(old);
                self.insert(item);
            }
            None => self.insert(item),
        }
    }

    /// The parent of a node at `height` and the node's index in it, or
    /// `None` for the root.
    fn parent_slot(&self, node: u32, height: u8) -> Option<(u32, usize)> {
        let parent = if height == 0 {
            self.leaves[node as usize].parent
        } else {
            self.inners[node as usize].parent
        };
        if parent == NONE {
            return None;
        }
        let p = &self.inners[parent as usize];
        let at = p.children[..usize::from(p.len)]
            .iter()
            .position(|&c| c == node)?;
        Some((parent, at))
    }

    fn set_parent(&mut self, node: u32, height: u8, parent: u32) {
        if height == 0 {
            self.leaves[node as usize].parent = parent;
        } else {
            self.inners[node as usize].parent = parent;
        }
    }

    /// A node's box and summary, from its own entries.
    fn box_of(&self, node: u32, height: u8) -> (Aabb, Traits) {
        if height == 0 {
            let items = self.items(node);
            (Aabb::of_items(items), traits_of_items(items))
        } else {
            let n = &self.inners[node as usize];
            let len = usize::from(n.len);
            (Aabb::of_boxes(&n.boxes[..len]), traits_of(&n.traits[..len]))
        }
    }

    /// Tightens the boxes and summaries above a node that lost an entry,
    /// up to the first one where neither changes.
    fn shrink_up(&mut self, mut node: u32, mut height: u8) {
        loop {
            let (b, t) = self.box_of(node, height);
            match self.parent_slot(node, height) {
                None => {
                    self.root_box = b;
                    self.root_traits = t;
                    return;
                }
                Some((p, i)) => {
                    let n = &mut self.inners[p as usize];
                    if n.boxes[i] == b && n.traits[i] == t {
                        return;
                    }
                    n.boxes[i] = b;
                    n.traits[i] = t;
                    node = p;
                    height += 1;
                }
            }
        }
    }

    /// Unlinks a node (not the root) from its parent and frees it; a parent
    /// left empty goes too, and a root left with one child hands over to it.
    fn detach(&mut self, node: u32, height: u8) {
        let Some((p, i)) = self.parent_slot(node, height) else {
            return;
        };
        self.free(node, height);
        let n = &mut self.inners[p as usize];
        let last = usize::from(n.len) - 1;
        n.children[i] = n.children[last];
        n.boxes[i] = n.boxes[last];
        n.traits[i] = n.traits[last];
        n.len -= 1;
        if n.len == 0 && p != self.root {
            self.detach(p, height + 1);
        } else {
            self.shrink_up(p, height + 1);
        }
        while self.height > 0 && self.inners[self.root as usize].len == 1 {
            let old = self.root;
            self.root = self.inners[old as usize].children[0];
            self.root_box = self.inners[old as usize].boxes[0];
            self.root_traits = self.inners[old as usize].traits[0];
            self.height -= 1;
            self.set_parent(self.root, self.height, NONE);
            self.free(old, self.height + 1);
        }
    }

    fn free(&mut self, node: u32, height: u8) {
        if height == 0 {
            let l = &mut self.leaves[node as usize];
            l.len = 0;
            l.parent = NONE;
            self.free_leaves.push(node);
        } else {
            let n = &mut self.inners[node as usize];
            n.len = 0;
            n.parent = NONE;
            self.free_inners.push(node);
        }
    }

    fn new_leaf(&mut self, parent: u32) -> u32 {
        let leaf = Leaf {
            parent,
            len: 0,
            items: [NO_ITEM; M],
        };
        alloc(&mut self.leaves, &mut self.free_leaves, leaf)
    }

    fn new_inner(&mut self, parent: u32, height: u8) -> u32 {
        let n = Inner {
            parent,
            len: 0,
            height,
            boxes: [Aabb::EMPTY; M],
            traits: [Traits::NONE; M],
            children: [NONE; M],
        };
        alloc(&mut self.inners, &mut self.free_inners, n)
    }

    /// Puts an item in a leaf whose ancestors' boxes already hold it,
    /// splitting the leaf if it is full.
    fn push_item(&mut self, leaf: u32, item: Item) {
        let l = &mut self.leaves[leaf as usize];
        let len = usize::from(l.len);
        self.leaf_of[item.slot as usize] = leaf;
        if len < M {
            l.items[len] = item;
            l.len += 1;
            return;
        }
        let mut all = [NO_ITEM; M + 1];
        all[..M].copy_from_slice(&l.items);
        all[M] = item;
        let cut = split(&mut all, |it| Aabb::point(it.v));
        let (a, b) = all.split_at(cut);
        let l = &mut self.leaves[leaf as usize];
        l.items[..a.len()].copy_from_slice(a);
        l.len = a.len() as u8;
        let parent = l.parent;
        let new = self.new_leaf(parent);
        let n = &mut self.leaves[new as usize];
        n.items[..b.len()].copy_from_slice(b);
        n.len = b.len() as u8;
        for it in b {
            self.leaf_of[it.slot as usize] = new;
        }
        let old = Entry {
            bbox: Aabb::of_items(a),
            traits: traits_of_items(a),
            child: leaf,
        };
        let new = Entry {
            bbox: Aabb::of_items(b),
            traits: traits_of_items(b),
            child: new,
        };
        self.attach(old, new, 0);
    }

    /// After `old.child` (at `height`) split: sets its box and summary in
    /// its parent and adds `new` beside it, splitting upwards as needed.
    fn attach(&mut self, old: Entry, new: Entry, height: u8) {
        let Some((p, i)) = self.parent_slot(old.child, height) else {
            let root = self.new_inner(NONE, height + 1);
            let r = &mut self.inners[root as usize];
            r.children[..2].copy_from_slice(&[old.child, new.child]);
            r.boxes[..2].copy_from_slice(&[old.bbox, new.bbox]);
            r.traits[..2].copy_from_slice(&[old.traits, new.traits]);
            r.len = 2;
            self.set_parent(old.child, height, root);
            self.set_parent(new.child, height, root);
            self.root = root;
            self.height = height + 1;
            self.root_box = old.bbox.merged(&new.bbox);
            self.root_traits = old.traits.union(new.traits);
            return;
        };
        let n = &mut self.inners[p as usize];
        n.boxes[i] = old.bbox;
        n.traits[i] = old.traits;
        let len = usize::from(n.len);
        if len < M {
            n.children[len] = new.child;
            n.boxes[len] = new.bbox;
            n.traits[len] = new.traits;
            n.len += 1;
            self.set_parent(new.child, height, p);
            return;
        }
        let mut all = [Entry {
            bbox: Aabb::EMPTY,
            traits: Traits::NONE,
            child: NONE,
        }; M + 1];
        for (j, e) in all[..M].iter_mut().enumerate() {
            *e = Entry {
                bbox: n.boxes[j],
                traits: n.traits[j],
                child: n.children[j],
            };
        }
        all[M] = new;
        let cut = split(&mut all, |e| e.bbox);
        let (a, b) = all.split_at(cut);
        let grand = n.parent;
        let sibling = self.new_inner(grand, height + 1);
        for (node, part) in [(p, a), (sibling, b)] {
            let n = &mut self.inners[node as usize];
            for (j, e) in part.iter().enumerate() {
                n.children[j] = e.child;
                n.boxes[j] = e.bbox;
                n.traits[j] = e.traits;
            }
            n.len = part.len() as u8;
            for e in part {
                self.set_parent(e.child, height, node);
            }
        }
        let half = |part: &[Entry], child: u32| Entry {
            bbox: part.iter().fold(Aabb::EMPTY, |b, e| b.merged(&e.bbox)),
            traits: part.iter().fold(Traits::NONE, |t, e| t.union(e.traits)),
            child,
        };
        let (a, b) = (half(a, p), half(b, sibling));
        self.attach(a, b, height + 1);
    }

    /// Checks every invariant of the module docs; panics on a broken one.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut seen = 0;
        let traits = self.check_node(self.root, self.height, &self.root_box, NONE, &mut seen);
        assert_eq!(seen, self.len, "item count");
        assert_eq!(traits, self.root_traits, "the root's summary");
        let combos = Combinations::of(self.iter().map(|it| it.traits));
        assert!(combos.present().eq(self.combos.present()), "combinations");
        for t in combos.present() {
            assert_eq!(combos.count(t), self.combos.count(t), "items with {t:?}");
        }
        for (slot, &leaf) in self.leaf_of.iter().enumerate() {
            if leaf != NONE {
                assert!(
                    self.items(leaf).iter().any(|it| it.slot as usize == slot),
                    "leaf_of[{slot}]"
                );
            }
        }
    }

    /// Checks the subtree of `node`; returns the union of its items' traits.
    #[cfg(test)]
    fn check_node(
        &self,
        node: u32,
        height: u8,
        bbox: &Aabb,
        parent: u32,
        seen: &mut usize,
    ) -> Traits {
        if height == 0 {
            let l = &self.leaves[node as usize];
            assert_eq!(l.parent, parent, "leaf {node}'s parent");
            assert!(node == self.root || l.len > 0, "empty leaf {node}");
            for it in l.items() {
                assert!(bbox.contains(&it.v), "item {} outside its box", it.slot);
                assert_eq!(self.leaf_of[it.slot as usize], node, "leaf_of {}", it.slot);
                *seen += 1;
            }
            traits_of_items(l.items())
        } else {
            let n = &self.inners[node as usize];
            assert_eq!(n.parent, parent, "inner {node}'s parent");
            assert_eq!(n.height, height, "inner {node}'s height");
            assert!(n.len > 0, "empty inner node {node}");
            assert!(node != self.root || n.len > 1, "root with one child");
            let mut all = Traits::NONE;
            for j in 0..usize::from(n.len) {
                let b = &n.boxes[j];
                assert!(
                    (0..3).all(|i| bbox.lo[i] <= b.lo[i] && b.hi[i] <= bbox.hi[i]),
                    "inner {node}'s child box outside its own"
                );
                let below = self.check_node(n.children[j], height - 1, b, node, seen);
                assert_eq!(n.traits[j], below, "inner {node}'s summary of child {j}");
                all = all.union(below);
            }
            all
        }
    }
}

/// Stores a node in a free place of its arena, or at the end; returns its index.
fn alloc<T>(arena: &mut Vec<T>, free: &mut Vec<u32>, node: T) -> u32 {
    if let Some(i) = free.pop() {
        arena[i as usize] = node;
        i
    } else {
        arena.push(node);
        (arena.len() - 1) as u32
    }
}

/// The child to descend into for a point: least volume enlargement, then
/// least margin enlargement (boxes of points on a line have no volume),
/// then the smaller box.
#[inline]
fn choose_child(boxes: &[Aabb], v: &[f64; 3]) -> usize {
    let mut best = 0;
    let mut best_key = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for (i, b) in boxes.iter().enumerate() {
        let key = if b.contains(v) {
            (0.0, 0.0, b.volume())
        } else {
            let mut g = *b;
            g.grow(v);
            let vol = g.volume();
            (vol - b.volume(), g.margin() - b.margin(), vol)
        };
        if key < best_key {
            best_key = key;
            best = i;
        }
    }
    best
}

/// Orders `entries` (M + 1 of them) for an R* split and returns where to
/// cut: the axis whose sorted cuts have the least total margin, then the
/// cut on it with the least overlap, then the least total volume.
fn split<T: Copy>(entries: &mut [T], bbox: impl Fn(&T) -> Aabb) -> usize {
    let n = entries.len();
    let cuts = MIN_SPLIT..=n - MIN_SPLIT;
    let sort = |entries: &mut [T], axis: usize| {
        entries.sort_unstable_by(|a, b| bbox(a).center(axis).total_cmp(&bbox(b).center(axis)));
    };
    // Boxes of every prefix and suffix of the sorted entries.
    let sides = |entries: &[T]| {
        let mut pre = [Aabb::EMPTY; M + 2];
        let mut suf = [Aabb::EMPTY; M + 2];
        for i in 0..n {
            pre[i + 1] = pre[i].merged(&bbox(&entries[i]));
        }
        for i in (0..n).rev() {
            suf[i] = suf[i + 1].merged(&bbox(&entries[i]));
        }
        (pre, suf)
    };
    let mut best_axis = 0;
    let mut best_margin = f64::INFINITY;
    for axis in 0..3 {
        sort(entries, axis);
        let (pre, suf) = sides(entries);
        let margin: f64 = cuts
            .clone()
            .map(|k| pre[k].margin() + suf[k].margin())
            .sum();
        if margin < best_margin {
            best_margin = margin;
            best_axis = axis;
        }
    }
    sort(entries, best_axis);
    let (pre, suf) = sides(entries);
    let mut best = MIN_SPLIT;
    let mut best_key = (f64::INFINITY, f64::INFINITY);
    for k in cuts {
        let key = (pre[k].overlap(&suf[k]), pre[k].volume() + suf[k].volume());
        if key < best_key {
            best_key = key;
            best = k;
        }
    }
    best
}

/// Splits `items` into `groups` runs of near-equal size, k-d style: each
/// cut is on the longest axis of `bbox`, a box around the items (the
/// parent's box cut at the parent's cut: no pass over the items to
/// measure them). Pushes each run's end (offset by `base`) onto `bounds`.
fn kd_partition(
    items: &mut [Item],
    bbox: Aabb,
    base: usize,
    groups: usize,
    bounds: &mut Vec<usize>,
) {
    if groups <= 1 {
        bounds.push(base + items.len());
        return;
    }
    let left = groups / 2;
    // Rounded up: each side then needs at most its share of nodes. As
    // `items.len() >= groups`, `at < items.len()` and each side has at
    // least one item per group.
    let at = (items.len() * left).div_ceil(groups);
    let axis = (0..3)
        .max_by(|&i, &j| bbox.extent(i).total_cmp(&bbox.extent(j)))
        .unwrap_or(0);
    items.select_nth_unstable_by(at, |a, b| a.v[axis].total_cmp(&b.v[axis]));
    let cut = items[at].v[axis];
    let (mut lb, mut rb) = (bbox, bbox);
    lb.hi[axis] = cut;
    rb.lo[axis] = cut;
    let (l, r) = items.split_at_mut(at);
    kd_partition(l, lb, base, left, bounds);
    kd_partition(r, rb, base + at, groups - left, bounds);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{Capabilities, Vehicle};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn item(slot: u32, v: [f64; 3], traits: Traits) -> Item {
        Item { v, slot, traits }
    }

    fn car(slot: u32, v: [f64; 3]) -> Item {
        item(slot, v, Traits::of(Vehicle::Car, Capabilities::NONE))
    }

    /// A driver's traits: one of three vehicle classes and any of three
    /// capabilities, so that every combination is common.
    fn traits() -> impl Strategy<Value = Traits> {
        crate::filter::strategies::traits(3, 3)
    }

    /// What a query may require: maybe a vehicle class (one that no item
    /// has among them), and some of four capabilities (one no item has).
    fn required() -> impl Strategy<Value = Traits> {
        crate::filter::strategies::required(4, 4)
    }

    /// A point of a small patch, as in a city: coordinates from a grid so
    /// that duplicates and shared coordinates happen.
    fn point() -> impl Strategy<Value = [f64; 3]> {
        (0u32..40, 0u32..40, 0u32..3).prop_map(|(a, b, c)| {
            [
                0.6 + f64::from(a) * 1e-4,
                0.7 + f64::from(b) * 1e-4,
                0.3 + f64::from(c) * 1e-5,
            ]
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert, or move (and maybe change traits).
        Put(u32, [f64; 3], Traits),
        /// Change only the traits of an item, if it is in the tree.
        Retrait(u32, Traits),
        Remove(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..300, point(), traits()).prop_map(|(s, v, t)| Op::Put(s, v, t)),
            1 => (0u32..300, traits()).prop_map(|(s, t)| Op::Retrait(s, t)),
            1 => (0u32..300).prop_map(Op::Remove),
        ]
    }

    /// The items within `d2` of `q` having `required`, by a walk that
    /// opens only boxes within it and summaries admitting it (what the
    /// search relies on), as a sorted slot list.
    fn within(t: &ShardTree, q: &[f64; 3], d2: f64, required: Traits) -> Vec<u32> {
        let mut out = Vec::new();
        let (root, b) = t.root();
        let mut stack = vec![(root, b)];
        if !t.traits().admits(required) {
            stack.clear();
        }
        while let Some((node, b)) = stack.pop() {
            if b.d2(q) > d2 {
                continue;
            }
            match node {
                NodeRef::Leaf(l) => out.extend(
                    t.items(l)
                        .iter()
                        .filter(|it| {
                            crate::position::chord2(&it.v, q) <= d2 && it.traits.has(required)
                        })
                        .map(|it| it.slot),
                ),
                NodeRef::Inner(n) => {
                    let c = t.children(n);
                    for i in 0..c.nodes.len() {
                        if c.traits[i].admits(required) {
                            stack.push((c.node(i), c.boxes[i]));
                        }
                    }
                }
            }
        }
        out.sort_unstable();
        out
    }

    fn model_within(
        m: &BTreeMap<u32, ([f64; 3], Traits)>,
        q: &[f64; 3],
        d2: f64,
        required: Traits,
    ) -> Vec<u32> {
        m.iter()
            .filter(|(_, (v, t))| crate::position::chord2(v, q) <= d2 && t.has(required))
            .map(|(s, _)| *s)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random insertions, moves, changes of traits and removals
        /// against a map: the invariants (summaries included) hold after
        /// every step, and range walks pruned by box and summary find
        /// exactly what a scan of the map finds, for every filter.
        #[test]
        fn matches_a_map(
            start in prop::collection::vec((point(), traits()), 0..200),
            ops in prop::collection::vec(op(), 1..400),
            q in point(),
            r in 0.0f64..3e-3,
            filters in prop::collection::vec(required(), 4),
        ) {
            let mut model: BTreeMap<u32, ([f64; 3], Traits)> = BTreeMap::new();
            for (s, vt) in start.iter().enumerate() {
                model.insert(s as u32, *vt);
            }
            let mut t = ShardTree::bulk_load(
                model.iter().map(|(&s, &(v, tr))| item(s, v, tr)).collect(),
            );
            t.check();
            for op in ops {
                match op {
                    Op::Put(s, v, tr) => {
                        if model.insert(s, (v, tr)).is_some() {
                            t.update(item(s, v, tr));
                        } else {
                            t.insert(item(s, v, tr));
                        }
                    }
                    Op::Retrait(s, tr) => {
                        if let Some(e) = model.get_mut(&s) {
                            e.1 = tr;
                            t.update(item(s, e.0, tr));
                        }
                    }
                    Op::Remove(s) => {
                        let got = t.get(s).map(|it| (it.v, it.traits));
                        prop_assert_eq!(t.remove(s), got.map(|g| g.1));
                        prop_assert_eq!(got, model.remove(&s));
                    }
                }
                t.check();
                prop_assert_eq!(t.len(), model.len());
            }
            for (s, vt) in &model {
                prop_assert_eq!(t.get(*s).map(|it| (it.v, it.traits)), Some(*vt));
            }
            let mut all: Vec<u32> = t.iter().map(|it| it.slot).collect();
            all.sort_unstable();
            prop_assert_eq!(&all, &model.keys().copied().collect::<Vec<_>>());
            for required in filters.into_iter().chain([Traits::NONE]) {
                for d2 in [r * r, 4.0] {
                    prop_assert_eq!(
                        within(&t, &q, d2, required),
                        model_within(&model, &q, d2, required)
                    );
                }
            }
        }
    }

    #[test]
    fn bulk_load_sizes_and_emptying() {
        for n in [0usize, 1, 13, 14, 15, 16, 17, 196, 197, 3000, 20_000] {
            let items: Vec<Item> = (0..n)
                .map(|i| {
                    let f = i as f64;
                    car(
                        i as u32,
                        [
                            0.6 + (f * 0.37).sin() * 1e-3,
                            0.7 + (f * 0.11).cos() * 1e-3,
                            0.3,
                        ],
                    )
                })
                .collect();
            let mut t = ShardTree::bulk_load(items.clone());
            t.check();
            assert_eq!(t.len(), n);
            // Remove everything, half of it by moving first.
            for it in &items {
                if it.slot % 2 == 0 {
                    t.update(Item {
                        v: [0.61, 0.69, 0.3],
                        ..*it
                    });
                }
            }
            t.check();
            for it in &items {
                assert!(t.remove(it.slot).is_some());
            }
            t.check();
            assert_eq!(t.len(), 0);
            assert!(t.remove(0).is_none());
            assert_eq!(t.iter().count(), 0);
        }
    }
}
