//! Striped async locks: a fixed set of mutexes, each key (an order id, a
//! driver id) mapped to one by its FNV-1a hash. Changes to one key are
//! serialised; changes to keys of different stripes run side by side.
//! The order locks of [`super::Persistence`] and the service layer's
//! driver journal locks are both this.

use tokio::sync::{Mutex, MutexGuard};

/// A fixed set of mutexes keyed by string.
#[derive(Debug)]
pub struct StripedLocks(Box<[Mutex<()>]>);

impl StripedLocks {
    /// `n` stripes (at least one).
    pub fn new(n: usize) -> Self {
        Self((0..n.max(1)).map(|_| Mutex::new(())).collect())
    }

    /// The stripe `key` takes (FNV-1a).
    pub fn stripe(&self, key: &str) -> usize {
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        (h % self.0.len() as u64) as usize
    }

    /// Locks `key`'s stripe.
    pub async fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        self.0[self.stripe(key)].lock().await
    }

    /// Locks the stripes of all `keys`, in stripe order, so two callers
    /// never wait on each other's stripes.
    pub async fn lock_all<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = keys.into_iter().map(|k| self.stripe(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for i in stripes {
            guards.push(self.0[i].lock().await);
        }
        guards
    }

    /// Every stripe no one holds now, taken (`None` where one is held),
    /// by stripe.
    pub fn try_lock_each(&self) -> Vec<Option<MutexGuard<'_, ()>>> {
        self.0.iter().map(|l| l.try_lock().ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_of_one_stripe_wait_for_each_other_and_others_do_not() {
        let locks = StripedLocks::new(8);
        let a = "order-a";
        let same = (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| locks.stripe(k) == locks.stripe(a))
            .expect("a key in a's stripe");
        let other = (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| locks.stripe(k) != locks.stripe(a))
            .expect("a key in another stripe");
        let held = locks.lock(a).await;
        assert!(locks.0[locks.stripe(&same)].try_lock().is_err());
        assert!(locks.0[locks.stripe(&other)].try_lock().is_ok());
        let idle = locks.try_lock_each();
        assert_eq!(idle.iter().filter(|g| g.is_none()).count(), 1);
        assert!(idle[locks.stripe(a)].is_none());
        drop(idle);
        drop(held);
        let all = locks.lock_all([a, same.as_str(), other.as_str()]).await;
        assert_eq!(all.len(), 2);
    }
}
