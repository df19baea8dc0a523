//! A minimal QMP client: connect, negotiate capabilities, run one command.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Runs one QMP command on the socket at `path` and returns its `return`.
pub fn execute(path: &Path, command: &str) -> std::io::Result<Value> {
    execute_with(path, command, Value::Null)
}

/// [`execute`] with `arguments` (a JSON object; `Null` for none).
pub fn execute_with(path: &Path, command: &str, arguments: Value) -> std::io::Result<Value> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    read_reply(&mut reader)?; // the greeting
    send(&mut writer, "qmp_capabilities", Value::Null)?;
    read_reply(&mut reader)?;
    send(&mut writer, command, arguments)?;
    read_reply(&mut reader)
}

fn send(writer: &mut UnixStream, command: &str, arguments: Value) -> std::io::Result<()> {
    let mut message = json!({ "execute": command });
    if !arguments.is_null() {
        message["arguments"] = arguments;
    }
    let mut line = message.to_string();
    line.push('\n');
    writer.write_all(line.as_bytes())
}

/// The next message that is not an asynchronous event.
fn read_reply(reader: &mut BufReader<UnixStream>) -> std::io::Result<Value> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "QMP socket closed",
            ));
        }
        let message: Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        if message.get("event").is_some() {
            continue;
        }
        if let Some(error) = message.get("error") {
            return Err(std::io::Error::other(format!("QMP error: {error}")));
        }
        return Ok(message.get("return").cloned().unwrap_or(message));
    }
}
