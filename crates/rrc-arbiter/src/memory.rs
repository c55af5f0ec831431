//! An arbiter in this process's memory: for unit tests of what is built
//! on the trait, and for nothing that needs two hosts to agree.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::{Arbiter, ArbiterError, Swapped, Term};

#[derive(Default)]
pub struct Memory {
    records: Mutex<HashMap<String, Vec<u8>>>,
}

impl Memory {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Arbiter for Memory {
    fn describe(&self) -> String {
        "an arbiter in memory".into()
    }

    fn read(&self, service: &str) -> Result<Option<Term>, ArbiterError> {
        let key = crate::key(service)?;
        self.records()
            .get(&key)
            .map(|b| Term::decode(service, b))
            .transpose()
    }

    fn swap(&self, service: &str, from: Option<&Term>, to: &Term) -> Result<Swapped, ArbiterError> {
        let key = crate::key(service)?;
        let mut r = self.records();
        let now = r.get(&key);
        if now.map(Vec::as_slice) != from.map(Term::encode).as_deref() {
            let stood = now.map(|b| Term::decode(service, b)).transpose()?;
            return Ok(Swapped::Stood(stood));
        }
        r.insert(key, to.encode());
        Ok(Swapped::Done)
    }
}
