/**
 * Chat prompts: the model file's own Jinja chat template when it has one (rendered by @huggingface/jinja, the
 * engine transformers.js uses), else a built-in Mistral/Mixtral instruct v1 formatter.
 */
import { Template, parse, tokenize } from '@huggingface/jinja';

export type ChatRole = 'system' | 'user' | 'assistant';

export interface ChatMessage {
  role: ChatRole;
  content: string;
}

export interface RenderChatOptions {
  /** A Jinja chat template (tokenizer.chat_template); absent = the built-in Mistral instruct v1 format. */
  template?: string;
  bosToken: string;
  eosToken: string;
  /** Ask the template to end with the assistant's turn opener (the v1 format has none: "[/INST]" is it). */
  addGenerationPrompt: boolean;
}

/** A conversation the template refuses, or a template that does not parse or render. */
export class ChatTemplateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ChatTemplateError';
  }
}

/**
 * tokenizer.chat_template of mistralai/Mixtral-8x7B-Instruct-v0.1 as released (Dec 2023, and as embedded in the
 * GGUF conversions of that release). Mistral later replaced it on the Hub with a variant that writes " [INST] "
 * with a leading space and accepts a leading system message; files carrying that one render through Jinja as usual.
 */
export const MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

export function renderChat(messages: readonly ChatMessage[], opts: RenderChatOptions): string {
  checkMessages(messages);
  if (opts.template === undefined) return renderMistralV1(messages, opts);
  return renderJinja(opts.template, messages, opts);
}

/**
 * The Mistral instruct v1 format, byte for byte what MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE renders:
 *   {bos}[INST] {user} [/INST]{assistant}{eos}[INST] {user2} [/INST]
 * That template has no system role. Here a leading system message is joined to the first user message with a
 * blank line ("{system}\n\n{user}"), as Mistral's later v1 templates and llama.cpp's "mistral-v1" format do.
 * Roles after it must alternate user/assistant starting with user, as the official template demands.
 */
function renderMistralV1(messages: readonly ChatMessage[], opts: RenderChatOptions): string {
  let system: string | undefined;
  let turns = messages;
  if (messages[0]?.role === 'system') {
    system = messages[0].content;
    turns = messages.slice(1);
    if (turns[0]?.role !== 'user') throw new ChatTemplateError('a system message must be followed by a user message (the Mistral format puts it inside the first [INST] block)');
  }
  let out = opts.bosToken;
  turns.forEach((m, i) => {
    if (m.role === 'system') throw new ChatTemplateError(`message ${messages.indexOf(m)}: a system message is only allowed first`);
    if ((m.role === 'user') !== (i % 2 === 0)) {
      throw new ChatTemplateError(`message ${messages.indexOf(m)}: after the optional system message, roles must alternate user/assistant/user/assistant/...`);
    }
    if (m.role === 'user') {
      const content = i === 0 && system !== undefined ? `${system}\n\n${m.content}` : m.content;
      out += `[INST] ${content} [/INST]`;
    } else {
      out += m.content + opts.eosToken;
    }
  });
  return out;
}

// Parsing dominates for short chats and the server renders the same template on every request.
let cached: { source: string; template: Template } | undefined;

/**
 * The library's global raise_exception cannot be replaced through render()'s variables (it refuses to redeclare
 * a name), so each parsed template starts with `{% set raise_exception = __moe_raise_exception %}` spliced into
 * its syntax tree (not its text, which would disturb trim_blocks whitespace handling). That lets a deliberate
 * rejection of the conversation be told apart from a broken template.
 */
const OVERRIDE_RAISE = parse(tokenize('{% set raise_exception = __moe_raise_exception %}')).body[0]!;

function compile(source: string): Template {
  if (cached?.source === source) return cached.template;
  let template: Template;
  try {
    template = new Template(source);
  } catch (e) {
    throw new ChatTemplateError(`the chat template does not parse: ${errorMessage(e)}`);
  }
  template.parsed.body.unshift(OVERRIDE_RAISE);
  cached = { source, template };
  return template;
}

function renderJinja(source: string, messages: readonly ChatMessage[], opts: RenderChatOptions): string {
  const template = compile(source);
  let raised: string | undefined;
  try {
    const out = template.render({
      messages: messages.map((m) => ({ role: m.role, content: m.content })),
      bos_token: opts.bosToken,
      eos_token: opts.eosToken,
      add_generation_prompt: opts.addGenerationPrompt,
      __moe_raise_exception: (message?: unknown) => {
        raised = String(message ?? 'raise_exception() called');
        throw new ChatTemplateError(raised);
      },
    });
    if (typeof out !== 'string') throw new Error(`rendered to a ${typeof out}, not a string`);
    return out;
  } catch (e) {
    if (raised !== undefined) throw new ChatTemplateError(`the chat template rejected the conversation: ${raised}`);
    throw new ChatTemplateError(`the chat template failed to render: ${errorMessage(e)}`);
  }
}

function checkMessages(messages: readonly ChatMessage[]): void {
  if (!Array.isArray(messages)) throw new ChatTemplateError('messages must be an array');
  messages.forEach((m, i) => {
    if (m === null || typeof m !== 'object') throw new ChatTemplateError(`message ${i} is not an object`);
    if (m.role !== 'system' && m.role !== 'user' && m.role !== 'assistant') {
      throw new ChatTemplateError(`message ${i}: role must be 'system', 'user' or 'assistant', got ${JSON.stringify(m.role)}`);
    }
    if (typeof m.content !== 'string') throw new ChatTemplateError(`message ${i}: content must be a string`);
  });
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
