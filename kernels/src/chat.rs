//! Chat templates: the Jinja template in the file's `tokenizer.chat_template`,
//! rendered with minijinja as real engines do; when a file has none, the built-in
//! template of its architecture (`arch::ArchSpec::default_chat_template`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template: {0}")]
    Template(String),
}

/// Used when the model file carries no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// llama.cpp's built-in Gemma template (`llm_chat_apply_template`, google/gemma-7b-it),
/// written in Jinja: "assistant" is "model"; Gemma has no system turn, so system
/// messages are trimmed, concatenated and put before the next user turn's text. No
/// `<bos>`: the tokenizer adds it (`tokenizer.ggml.add_bos_token`). Contents are
/// trimmed of Unicode whitespace (llama.cpp trims ASCII whitespace only; the two
/// differ only for text that starts or ends with other spaces, such as U+00A0).
pub const GEMMA: &str = concat!(
    "{%- set ns = namespace(system='') -%}",
    "{%- for message in messages -%}",
    "{%- if message['role'] == 'system' -%}",
    "{%- set ns.system = ns.system + (message['content'] | trim) -%}",
    "{%- else -%}",
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}",
    "{{ '<start_of_turn>' + role + '\n' }}",
    "{%- if ns.system and role != 'model' -%}{{ ns.system + '\n\n' }}{%- set ns.system = '' -%}{%- endif -%}",
    "{{ (message['content'] | trim) + '<end_of_turn>\n' }}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}",
);

pub fn render(
    template: Option<&str>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String, ChatError> {
    let mut env = minijinja::Environment::new();
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let err = |e: minijinja::Error| ChatError::Template(e.to_string());
    env.add_template("chat", template.unwrap_or(CHATML)).map_err(err)?;
    let tmpl = env.get_template("chat").map_err(err)?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders() {
        let m = vec![ChatMessage { role: "user".into(), content: "Hi".into() }];
        let s = render(None, &m, true, "", "").expect("render");
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn gemma_renders_as_llama_cpp_builtin() {
        let s = render(Some(GEMMA), &[msg("user", "Hi")], true, "<bos>", "<eos>").expect("render");
        assert_eq!(s, "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
        // System text goes before the next user turn; assistant is "model"; contents trimmed.
        let m = [
            msg("system", " Be brief. "),
            msg("system", "Be kind."),
            msg("user", " What is 2+2?\n"),
            msg("assistant", "4"),
            msg("user", "And 3+3?"),
        ];
        let s = render(Some(GEMMA), &m, false, "", "").expect("render");
        assert_eq!(
            s,
            "<start_of_turn>user\nBe brief.Be kind.\n\nWhat is 2+2?<end_of_turn>\n\
             <start_of_turn>model\n4<end_of_turn>\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        );
    }

    #[test]
    fn template_errors_are_typed() {
        let m = vec![ChatMessage { role: "user".into(), content: "Hi".into() }];
        assert!(render(Some("{{ raise_exception('nope') }}"), &m, true, "", "").is_err());
        assert!(render(Some("{% for %}"), &m, true, "", "").is_err());
    }
}
