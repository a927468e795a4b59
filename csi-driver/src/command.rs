//! Running the host tools the node plugin drives (mount, losetup, mkfs,
//! blkid, resize2fs, nbd-client...), with their stderr in the error.

use std::process::Output;

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {program}: {source} (is it installed on this node?)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Runs a command to completion, whatever its exit status.
pub async fn output(program: &str, args: &[&str]) -> Result<Output, CommandError> {
    tracing::debug!(program, ?args, "running");
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| CommandError::Spawn {
            program: program.to_string(),
            source,
        })
}

/// Runs a command that must succeed; returns its stdout, trimmed.
pub async fn run(program: &str, args: &[&str]) -> Result<String, CommandError> {
    let out = output(program, args).await?;
    if !out.status.success() {
        return Err(failed(program, args, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn failed(program: &str, args: &[&str], out: &Output) -> CommandError {
    CommandError::Failed {
        command: format!("{program} {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}
