//! Places held per key (a node, a dashboard session): at most so many at
//! once for one key, each given back when its guard is dropped, and a key
//! with none held takes no room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The places of every key.
pub struct KeyedSlots {
    max_per_key: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

/// One place of one key: given back when dropped.
pub struct KeyedSlot {
    key: String,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl KeyedSlots {
    pub fn new(max_per_key: usize) -> Self {
        Self {
            max_per_key,
            held: Arc::default(),
        }
    }

    /// At most this many for one key.
    pub fn max_per_key(&self) -> usize {
        self.max_per_key
    }

    /// A place for `key`, or None when it holds all of its own.
    pub fn take(&self, key: &str) -> Option<KeyedSlot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(key.to_string()).or_insert(0);
        if *n >= self.max_per_key {
            return None;
        }
        *n += 1;
        Some(KeyedSlot {
            key: key.to_string(),
            held: self.held.clone(),
        })
    }

    /// Places `key` holds now.
    pub fn held(&self, key: &str) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Keys holding a place now.
    pub fn keys(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for KeyedSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_takes_its_share_and_gives_it_back() {
        let slots = KeyedSlots::new(2);
        let a: Vec<KeyedSlot> = (0..2).map(|_| slots.take("a").unwrap()).collect();
        assert!(slots.take("a").is_none());
        let b = slots.take("b").unwrap();
        assert_eq!(slots.keys(), 2);
        drop(a);
        assert!(slots.take("a").is_some());
        drop(b);
        assert_eq!(slots.keys(), 0);
    }
}
