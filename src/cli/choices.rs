//! The library's [`Choice`] types as command-line values: their names and
//! help are the possible values clap lists and accepts.

use crate::auto::MetricName;
use crate::choice::Choice;
use crate::pipeline::Backend;
use crate::pipeline::qat::LossChoice;
use clap::builder::PossibleValue;

macro_rules! value_enum {
    ($($ty:ty),*) => {$(
        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                <$ty as Choice>::ALL
            }

            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(PossibleValue::new(Choice::name(*self)).help(Choice::help(*self)))
            }
        }
    )*};
}

value_enum!(MetricName, Backend, LossChoice);
