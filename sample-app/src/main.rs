//! The sample order service. The end-to-end demo lands with the sample-app
//! issue; until then this binary only explains where to look.

fn main() {
    println!("sample-app: not yet implemented; run `./dev demo` for the relay demo");
}
