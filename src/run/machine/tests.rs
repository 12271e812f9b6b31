//! Unit tests of the pure transition: every phase and failure kind.

use super::*;
