//! `ascend-quant completions SHELL`: the shell completion script, from the
//! argument definitions.

use super::Cli;
use clap::CommandFactory;

/// Arguments of `completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// The completion script for `shell`.
pub fn script(shell: clap_complete::Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ascend-quant", &mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    match shell {
        // clap_complete 4.6 spells the states of a hyphenated program's
        // subcommands two ways in bash (`ascend__quant__subcmd__run` where it
        // walks the words, `ascend__subcmd__quant__subcmd__run` where it
        // matches them), so no subcommand's flags would complete: use the
        // first spelling throughout.
        clap_complete::Shell::Bash => text.replace("ascend__subcmd__quant", "ascend__quant"),
        _ => text,
    }
}
