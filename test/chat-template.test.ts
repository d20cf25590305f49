import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { ChatTemplateError, MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE, renderChat, type ChatMessage } from '../src/workflows/chat-template.js';

const MISTRAL = { bosToken: '<s>', eosToken: '</s>', addGenerationPrompt: true };

/** Cases from llama.cpp's tests/test-chat-template.cpp: template, special tokens and the output llama.cpp expects. */
const llamacpp = JSON.parse(readFileSync(new URL('../../test/fixtures/chat-templates-llamacpp.json', import.meta.url), 'utf8')) as {
  conversation: ChatMessage[];
  cases: { name: string; template: string; bos_token: string; eos_token: string; add_generation_prompt: boolean; expected: string }[];
};

const conversations: ChatMessage[][] = [
  [{ role: 'user', content: 'Hello' }],
  [
    { role: 'user', content: 'Hello' },
    { role: 'assistant', content: 'Hi there' },
    { role: 'user', content: 'Who are you' },
  ],
  [
    { role: 'user', content: 'Write {{ a }} and {% raw %} and \'quotes\' "double"\nover two lines' },
    { role: 'assistant', content: '   I am an assistant   ' },
    { role: 'user', content: 'Ça va? 日本語 🤖' },
    { role: 'assistant', content: 'Oui.' },
  ],
  [
    { role: 'user', content: '' },
    { role: 'assistant', content: '' },
    { role: 'user', content: '[INST] nested [/INST]' },
  ],
  [],
];

test('built-in format equals the official Mixtral-8x7B-Instruct-v0.1 template rendered through Jinja', () => {
  for (const messages of conversations) {
    const jinja = renderChat(messages, { ...MISTRAL, template: MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE });
    assert.equal(renderChat(messages, MISTRAL), jinja);
  }
  // The shape, spelled out once: no space after BOS or EOS, one space inside [INST] ... [/INST].
  assert.equal(renderChat(conversations[1]!, MISTRAL), '<s>[INST] Hello [/INST]Hi there</s>[INST] Who are you [/INST]');
});

test('llama.cpp expected outputs: Jinja plumbing (messages, bos/eos, add_generation_prompt, set/slices/is defined)', () => {
  assert.ok(llamacpp.cases.length >= 2);
  for (const c of llamacpp.cases) {
    const out = renderChat(llamacpp.conversation, {
      template: c.template,
      bosToken: c.bos_token,
      eosToken: c.eos_token,
      addGenerationPrompt: c.add_generation_prompt,
    });
    assert.equal(out, c.expected, c.name);
  }
  // add_generation_prompt reaches the template (the ChatML case appends the assistant opener only when asked).
  const chatml = llamacpp.cases.find((c) => c.template.includes('<|im_start|>'))!;
  const without = renderChat(llamacpp.conversation, { template: chatml.template, bosToken: '', eosToken: '', addGenerationPrompt: false });
  assert.equal(without + '<|im_start|>assistant\n', chatml.expected);
});

test('a leading system message joins the first user message with a blank line (as Mistral\'s v1-with-system template)', () => {
  const messages: ChatMessage[] = [
    { role: 'system', content: 'Be brief.' },
    { role: 'user', content: 'Hello' },
    { role: 'assistant', content: 'Hi' },
    { role: 'user', content: 'Bye' },
  ];
  assert.equal(renderChat(messages, MISTRAL), '<s>[INST] Be brief.\n\nHello [/INST]Hi</s>[INST] Bye [/INST]');
  // Mistral's later template (llama.cpp fixture) joins the same way; it differs only by a space before [INST]
  // and before each answer, which the v0.1 format does not have.
  const v1sys = llamacpp.cases.find((c) => c.template.includes('system_message'))!;
  const later = renderChat(messages, { template: v1sys.template, ...MISTRAL });
  assert.equal(later.replaceAll(' [INST] ', '[INST] ').replace('[/INST] Hi', '[/INST]Hi'), renderChat(messages, MISTRAL));
  assert.throws(() => renderChat([{ role: 'system', content: 's' }], MISTRAL), ChatTemplateError);
  assert.throws(() => renderChat([{ role: 'user', content: 'a' }, { role: 'system', content: 's' }], MISTRAL), /only allowed first/);
});

test('roles must alternate user/assistant: the official template raises, the built-in agrees', () => {
  const bad: ChatMessage[][] = [
    [{ role: 'assistant', content: 'first' }],
    [
      { role: 'user', content: 'a' },
      { role: 'user', content: 'b' },
    ],
    [
      { role: 'user', content: 'a' },
      { role: 'assistant', content: 'b' },
      { role: 'assistant', content: 'c' },
    ],
  ];
  for (const messages of bad) {
    assert.throws(
      () => renderChat(messages, { ...MISTRAL, template: MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE }),
      (e: unknown) => e instanceof ChatTemplateError && /rejected the conversation: Conversation roles must alternate/.test(e.message),
    );
    assert.throws(() => renderChat(messages, MISTRAL), (e: unknown) => e instanceof ChatTemplateError && /alternate/.test(e.message));
  }
  // The official template has no system role at all.
  assert.throws(
    () => renderChat([{ role: 'system', content: 's' }, { role: 'user', content: 'u' }], { ...MISTRAL, template: MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE }),
    /rejected the conversation/,
  );
});

test('templates that do not parse or fail while rendering, and malformed messages, give clear ChatTemplateErrors', () => {
  assert.throws(() => renderChat(conversations[0]!, { ...MISTRAL, template: '{% for m in messages %}{{ m.content }}' }), /does not parse/);
  assert.throws(() => renderChat(conversations[0]!, { ...MISTRAL, template: '{{ messages[0].content.nope() }}' }), /failed to render/);
  assert.throws(() => renderChat([{ role: 'tool', content: 'x' } as unknown as ChatMessage], MISTRAL), /role must be/);
  assert.throws(() => renderChat([{ role: 'user', content: 3 } as unknown as ChatMessage], MISTRAL), /content must be a string/);
  // Re-rendering a cached template with different data is independent of the previous call.
  const t = '{{ bos_token }}{{ messages | length }}';
  assert.equal(renderChat(conversations[0]!, { ...MISTRAL, template: t }), '<s>1');
  assert.equal(renderChat(conversations[1]!, { ...MISTRAL, template: t, bosToken: 'B' }), 'B3');
});
