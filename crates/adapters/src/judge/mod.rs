//! Judges that talk to something outside: [`llm`], a language model behind an
//! OpenAI-compatible HTTP API. The port ([`poller_core::judging::Judge`]) and the rule judges
//! are the core's.

pub mod llm;
