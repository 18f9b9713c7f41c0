//! The id role (seed 004's id server, command 40): unique, increasing ids per key, counted in
//! memory over steps reserved in the metadata database ([`StepAllocator`]), so neither a
//! restart nor a second id server on the same database ever hands out an id twice.

use crate::ids::StepAllocator;
use crate::meta::MetaStore;
use crate::storage::OpError;
use ferry_common::proto::{ErrorCode, IdGet, IdReply};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Most distinct keys one id server counts for (each holds an allocator in memory).
pub const KEYS_MAX: usize = 1024;

pub struct IdServer {
    meta: Arc<dyn MetaStore>,
    step: u64,
    keys: Mutex<HashMap<String, Arc<StepAllocator>>>,
}

impl IdServer {
    pub fn new(meta: Arc<dyn MetaStore>, step: u64) -> IdServer {
        IdServer {
            meta,
            step,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// ID_GET: `count` consecutive ids of `key`.
    pub fn get(&self, q: &IdGet) -> Result<IdReply, OpError> {
        let alloc = {
            let mut keys = self.keys.lock();
            if let Some(a) = keys.get(&q.key) {
                a.clone()
            } else {
                if keys.len() >= KEYS_MAX {
                    return Err(OpError::new(
                        ErrorCode::Limit,
                        format!(
                            "id server counts {KEYS_MAX} keys already; key {} refused",
                            q.key
                        ),
                    ));
                }
                let a = Arc::new(StepAllocator::new(self.meta.clone(), &q.key, self.step));
                keys.insert(q.key.clone(), a.clone());
                a
            }
        };
        let first = alloc.next_ids(u64::from(q.count)).map_err(|e| {
            OpError::new(
                ErrorCode::Unavailable,
                format!("cannot reserve ids for key {}: {e:#}", q.key),
            )
        })?;
        Ok(IdReply {
            first,
            count: q.count,
        })
    }
}
