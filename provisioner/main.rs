fn main() -> std::process::ExitCode {
    testbed::cli::main()
}
