//! A minimal QMP client: greeting, `qmp_capabilities`, then one command at a time.
//! Asynchronous events arriving between a command and its reply are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::BackendError;

pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl QmpClient {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, BackendError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| BackendError::io(format!("connecting to QMP at {}", path.display()), e))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| BackendError::io("QMP timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| BackendError::io("QMP socket", e))?;
        let mut c = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = c.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(BackendError::Qmp(format!("unexpected greeting {greeting}")));
        }
        c.execute("qmp_capabilities", None)?;
        Ok(c)
    }

    fn read_message(&mut self) -> Result<Value, BackendError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| BackendError::io("reading QMP", e))?;
        if n == 0 {
            return Err(BackendError::Qmp("connection closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| BackendError::Qmp(format!("bad JSON {line:?}: {e}")))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, BackendError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| BackendError::Qmp(e.to_string()))?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| BackendError::io("writing QMP", e))?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(BackendError::Qmp(format!("{command}: {err}")));
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
        }
    }
}
