//! Closed sets of named choices a user picks by name: on the command line,
//! in a configuration or from another language. The library's choice types
//! implement [`Choice`]; the command line maps it onto its parser (see
//! `cli/choices.rs`), so the types themselves know nothing of any parser.

/// A closed set of choices, each with a stable name and a line of help.
pub trait Choice: Sized + Copy + PartialEq + 'static {
    /// Every choice, in the order help lists them.
    const ALL: &'static [Self];

    /// The name a user writes.
    fn name(self) -> &'static str;

    /// One line saying what the choice does.
    fn help(self) -> &'static str;

    /// The choice called `name`, or an error listing the names there are.
    fn from_name(name: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|c| c.name()).collect();
                format!("'{name}' is not one of: {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::Choice;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Colour {
        Red,
        Blue,
    }

    impl Choice for Colour {
        const ALL: &'static [Self] = &[Colour::Red, Colour::Blue];
        fn name(self) -> &'static str {
            match self {
                Colour::Red => "red",
                Colour::Blue => "blue",
            }
        }
        fn help(self) -> &'static str {
            ""
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        assert_eq!(Colour::from_name("blue"), Ok(Colour::Blue));
        assert_eq!(Colour::from_name("red"), Ok(Colour::Red));
        assert_eq!(
            Colour::from_name("green").unwrap_err(),
            "'green' is not one of: red, blue"
        );
    }
}
