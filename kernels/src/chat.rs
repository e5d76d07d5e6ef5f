//! Chat templates: the Jinja template in the file's `tokenizer.chat_template`,
//! rendered with minijinja as real engines do; ChatML when a file has none.

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

    #[test]
    fn template_errors_are_typed() {
        let m = vec![ChatMessage { role: "user".into(), content: "Hi".into() }];
        assert!(render(Some("{{ raise_exception('nope') }}"), &m, true, "", "").is_err());
        assert!(render(Some("{% for %}"), &m, true, "", "").is_err());
    }
}
