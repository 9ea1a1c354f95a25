//! The judges: the core's panel and rule judges, the LLM judge adapter, and the `[panel]`
//! section that says which judges sit on the panel.

pub use poller_adapters::judge::llm;
pub use poller_core::judging::*;

use crate::clock::de;
use llm::TokenLimitParam;
use rules::RuleSet;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PanelSettings {
    /// Judges that must actually answer (approve or deny) for an approval to count.
    pub quorum: usize,
    pub judges: Vec<JudgeSettings>,
    /// Synthetic commands put to the panel on a timer (`[panel.canary]`, off by default).
    #[serde(default)]
    pub canary: canary::CanarySettings,
}

/// One judge of the panel, by kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JudgeSettings {
    /// A built-in rule-based judge.
    Rules {
        name: String,
        /// How long this judge may deliberate; past it, it counts as unavailable. Key
        /// `timeout_ms`.
        #[serde(rename = "timeout_ms", deserialize_with = "de::millis")]
        timeout: Duration,
        rules: RuleSet,
    },
    /// A language model over the OpenAI-compatible chat API.
    Llm {
        name: String,
        /// The judge's whole deadline, retries included. Key `timeout_ms`.
        #[serde(rename = "timeout_ms", deserialize_with = "de::millis")]
        timeout: Duration,
        /// Base URL of the API, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`.
        base_url: String,
        model: String,
        /// Environment variable holding the API key (sent as a Bearer token, never logged).
        /// Optional: local servers usually need none.
        #[serde(default)]
        api_key_env: Option<String>,
        /// Sampling temperature, sent only when set: 0 for repeatable verdicts where the model
        /// takes it. OpenAI's reasoning models (o-series, GPT-5) refuse anything but their
        /// default, so leave it out for them.
        #[serde(default)]
        temperature: Option<f32>,
        /// Upper bound on the answer's length in tokens. A verdict needs well under 100; a
        /// small CPU model can emit whitespace inside a JSON grammar until this limit, so keep
        /// it tight. Reasoning models count their hidden reasoning in it too: give them more.
        #[serde(default = "default_max_tokens")]
        max_tokens: u32,
        /// The request field that carries `max_tokens`: `max_tokens` (llama.cpp, Ollama,
        /// vLLM, older OpenAI models) or `max_completion_tokens` (OpenAI o-series and GPT-5,
        /// Azure OpenAI, vLLM).
        #[serde(default)]
        token_limit_param: TokenLimitParam,
        /// The role's system prompt (what it weighs), e.g. `config/prompts/security.md`.
        prompt_file: PathBuf,
    },
}

fn default_max_tokens() -> u32 {
    200
}

impl JudgeSettings {
    pub fn name(&self) -> &str {
        match self {
            JudgeSettings::Rules { name, .. } | JudgeSettings::Llm { name, .. } => name,
        }
    }
}
