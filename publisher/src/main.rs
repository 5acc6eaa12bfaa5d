//! The `publisher` program; everything lives in the library (see `publisher::cli`).

fn main() {
    publisher::cli::main()
}
