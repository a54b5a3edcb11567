//! `senet`: the command-line tool; it lives in the library (`senet::cli`).

fn main() -> std::process::ExitCode {
    senet::cli::main()
}
