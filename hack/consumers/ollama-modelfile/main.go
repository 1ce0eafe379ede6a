// ollama-modelfile reads Modelfiles with Ollama's own parser and renders conversations with its
// own template engine (github.com/ollama/ollama v0.17.4: parser, template), the way `ollama create`
// stores a model and `ollama run` / POST /api/chat build the prompt from it.
//
//	ollama-modelfile < requests.json
//
// stdin: a JSON array of {"modelfile": TEXT, "conversations": [[{"role", "content"}, ...], ...]}.
// stdout: a JSON array, per request, of {"template", "system", "parameters", "prompts"} (one prompt
// per conversation) or {"error"}.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/parser"
	"github.com/ollama/ollama/template"
)

type request struct {
	Modelfile     string          `json:"modelfile"`
	Conversations [][]api.Message `json:"conversations"`
}

type response struct {
	Template   string         `json:"template,omitempty"`
	System     string         `json:"system,omitempty"`
	Parameters map[string]any `json:"parameters,omitempty"`
	Prompts    []string       `json:"prompts,omitempty"`
	Error      string         `json:"error,omitempty"`
}

func render(req request) (*response, error) {
	modelfile, err := parser.ParseFile(strings.NewReader(req.Modelfile))
	if err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	// What `ollama create` sends the server; FROM names a file that is not here, which Ollama takes
	// as a model name: only TEMPLATE, SYSTEM and PARAMETER matter for the prompt.
	create, err := modelfile.CreateRequest("")
	if err != nil {
		return nil, fmt.Errorf("create request: %w", err)
	}
	tmpl, err := template.Parse(create.Template)
	if err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	out := &response{Template: create.Template, System: create.System, Parameters: create.Parameters}
	for _, msgs := range req.Conversations {
		// server/routes.go ChatHandler: the model's SYSTEM leads a conversation that has none.
		if len(msgs) > 0 && msgs[0].Role != "system" && create.System != "" {
			msgs = append([]api.Message{{Role: "system", Content: create.System}}, msgs...)
		}
		var b bytes.Buffer
		if err := tmpl.Execute(&b, template.Values{Messages: msgs}); err != nil {
			return nil, fmt.Errorf("execute: %w", err)
		}
		out.Prompts = append(out.Prompts, b.String())
	}
	return out, nil
}

func main() {
	var reqs []request
	if err := json.NewDecoder(os.Stdin).Decode(&reqs); err != nil {
		fmt.Fprintln(os.Stderr, "stdin: a JSON array of requests:", err)
		os.Exit(2)
	}
	out := make([]*response, 0, len(reqs))
	for _, req := range reqs {
		resp, err := render(req)
		if err != nil {
			resp = &response{Error: err.Error()}
		}
		out = append(out, resp)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
