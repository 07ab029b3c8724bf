// The official OpenAI Node SDK against tokenspool, as a new user writes it: a background response streamed,
// the connection dropped after a few events, then resumed with the SDK's own retrieve(..., starting_after)
// on another gateway. Prints one JSON line: the sequence numbers and text seen, and the final response.
// Usage: node resume_response.mjs FIRST_BASE_URL SECOND_BASE_URL API_KEY MODEL
import OpenAI from "openai";

const [first, second, apiKey, model] = process.argv.slice(2);
const here = new OpenAI({ baseURL: first, apiKey, maxRetries: 0 });
const there = new OpenAI({ baseURL: second, apiKey, maxRetries: 0 });

const seen = [];
let text = "";
let responseId = null;
const stream = await here.responses.create({ model, input: "Hello from Node", background: true, stream: true });
for await (const event of stream) {
  if (event.type === "response.created") responseId = event.response.id;
  if (event.type === "response.output_text.delta") text += event.delta;
  seen.push(event.sequence_number);
  if (seen.length === 6) {
    stream.controller.abort(); // the connection drops
    break;
  }
}
const resumed = await there.responses.retrieve(responseId, { stream: true, starting_after: seen.at(-1) });
let last = null;
for await (const event of resumed) {
  if (event.type === "response.output_text.delta") text += event.delta;
  seen.push(event.sequence_number);
  last = event;
}
const final = await there.responses.retrieve(responseId);
console.log(JSON.stringify({ seen, text, lastType: last.type, status: final.status, output: final.output_text }));
