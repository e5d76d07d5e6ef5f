//! The models this node serves, loaded once at start-up.

use std::path::Path;
use std::sync::Arc;

use sampo_consensus::{Hash32, ModelId, Prompt, TaskSpec};
use sampo_kernels::{Backend, ChatMessage, Engine, KernelError, Model, SamplingParams};

/// One served model on its backend.
pub struct LoadedModel {
    pub id: ModelId,
    pub name: String,
    pub engine: Engine,
    pub price_per_1k: u64,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("name", &self.name).field("id", &self.id).finish()
    }
}

impl LoadedModel {
    pub fn load(
        path: &Path,
        name: Option<String>,
        price_per_1k: u64,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, KernelError> {
        Ok(Self::new(Arc::new(Model::load(path)?), name, price_per_1k, backend))
    }

    pub fn new(model: Arc<Model>, name: Option<String>, price_per_1k: u64, backend: Arc<dyn Backend>) -> Self {
        let id = ModelId(Hash32(model.file_hash));
        let name = name.unwrap_or_else(|| {
            let n = model.hp.name.trim().to_lowercase().replace(' ', "-");
            if n.is_empty() { id.to_string()[..16].to_owned() } else { n }
        });
        Self { id, name, engine: Engine::new(model, backend), price_per_1k }
    }

    pub fn context_length(&self) -> usize {
        self.engine.model.hp.n_ctx
    }

    /// The prompt tokens of a task, exactly as every committee member computes them.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>, KernelError> {
        match prompt {
            // BOS first when the file asks for it (Gemma), as llama.cpp does.
            Prompt::Text(t) => Ok(self.engine.tokenizer().encode_prompt(t)),
            Prompt::Chat(msgs) => {
                let msgs: Vec<ChatMessage> =
                    msgs.iter().map(|m| ChatMessage { role: m.role.clone(), content: m.content.clone() }).collect();
                self.engine.chat_prompt(&msgs)
            }
        }
    }

    /// Sampling parameters of a task: the spec's, plus the model's end-of-turn tokens as
    /// stops (the same for every member, since they come from the same file).
    pub fn sampling(&self, spec: &TaskSpec) -> SamplingParams {
        let p = &spec.params;
        let mut stop = p.stop.clone();
        for t in &self.engine.tokenizer().eot {
            if !stop.contains(t) {
                stop.push(*t);
            }
        }
        SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            seed: p.seed,
            max_tokens: p.max_tokens,
            stop,
        }
    }

    pub fn detokenize(&self, tokens: &[u32]) -> String {
        let tok = self.engine.tokenizer();
        let mut dec = sampo_kernels::StreamDecoder::new();
        let mut out = String::new();
        for t in tokens {
            if let Ok(piece) = dec.push(tok, *t) {
                out.push_str(&piece);
            }
        }
        out
    }
}

/// All served models.
#[derive(Debug, Default, Clone)]
pub struct Models(pub Vec<Arc<LoadedModel>>);

impl Models {
    pub fn by_name(&self, name: &str) -> Option<&Arc<LoadedModel>> {
        self.0.iter().find(|m| m.name == name || m.id.to_string() == name)
    }
    pub fn by_id(&self, id: &ModelId) -> Option<&Arc<LoadedModel>> {
        self.0.iter().find(|m| m.id == *id)
    }
}
