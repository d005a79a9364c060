//! `--generate`: shell completions and a man page, made from the same clap
//! definition as `--help`, so that they can never disagree with it.

use std::io::Write;

use clap::CommandFactory;

use super::Args;

/// What `--generate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generate {
    /// A man page (roff), for `man -l` or a `man1` folder.
    Man,
    /// Completions for bash.
    CompleteBash,
    /// Completions for zsh.
    CompleteZsh,
    /// Completions for fish.
    CompleteFish,
    /// Completions for PowerShell.
    CompletePowershell,
}

/// Writes what `kind` asks for to `out`.
pub fn generate(kind: Generate, out: &mut dyn Write) -> std::io::Result<()> {
    let mut command = Args::command();
    let name = command.get_name().to_string();
    let shell = match kind {
        Generate::Man => return clap_mangen::Man::new(command).render(out),
        Generate::CompleteBash => clap_complete::Shell::Bash,
        Generate::CompleteZsh => clap_complete::Shell::Zsh,
        Generate::CompleteFish => clap_complete::Shell::Fish,
        Generate::CompletePowershell => clap_complete::Shell::PowerShell,
    };
    clap_complete::generate(shell, &mut command, name, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(kind: Generate) -> String {
        let mut out = vec![];
        generate(kind, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_man_page_documents_every_option() {
        let man = generated(Generate::Man);
        assert!(man.starts_with(".ie"), "{}", &man[..man.len().min(80)]);
        for arg in Args::command().get_arguments() {
            if let Some(long) = arg.get_long() {
                // roff escapes the dashes.
                assert!(man.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))), "--{long} is missing");
            }
        }
    }

    #[test]
    fn completions_know_the_options() {
        for kind in
            [Generate::CompleteBash, Generate::CompleteZsh, Generate::CompleteFish, Generate::CompletePowershell]
        {
            let script = generated(kind);
            assert!(script.contains("max-depth"), "{kind:?}");
            assert!(script.contains("classifier"), "{kind:?}");
        }
    }
}
