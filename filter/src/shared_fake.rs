//! Envoy's shared data as the unit tests fake it (the follower's, the reporter's and the
//! catalog's tests): values with CAS tokens, where a token of 0 (the key is absent) sets
//! unconditionally, as Envoy's does.

use std::cell::{Ref, RefCell, RefMut};
use std::collections::BTreeMap;

type Values = BTreeMap<String, (Vec<u8>, u32)>;

#[derive(Default)]
pub struct SharedData(RefCell<Values>);

impl SharedData {
    /// A value and its CAS token (`(None, 0)` when absent).
    pub fn get(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        Some(match self.0.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        })
    }

    /// Sets `key` unless its token moved past `cas`.
    pub fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let mut d = self.0.borrow_mut();
        let cur = d.get(key).map_or(0, |(_, c)| *c);
        if cas.is_some_and(|c| c != 0 && c != cur) {
            return false;
        }
        d.insert(key.to_string(), (value.to_vec(), cur + 1));
        true
    }

    pub fn borrow(&self) -> Ref<'_, Values> {
        self.0.borrow()
    }

    pub fn borrow_mut(&self) -> RefMut<'_, Values> {
        self.0.borrow_mut()
    }
}
