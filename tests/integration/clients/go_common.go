// What go_pgx.go and go_pq.go share (built with each, package main): DRIVER_CONFIG's shape, and printing
// one JSON object per step, its result or its error (each program's failure() renders its driver's errors).
package main

import (
	"context"
	"encoding/json"
	"fmt"
)

type client struct {
	User     string `json:"user"`
	Password string `json:"password"`
}

type config struct {
	Host     string            `json:"host"`
	Port     int               `json:"port"`
	Database string            `json:"database"`
	Run      int               `json:"run"`
	Clients  map[string]client `json:"clients"`
	Context  *struct {
		Key     string            `json:"key"`
		Tenants map[string]string `json:"tenants"`
	} `json:"context"`
	Admin   string `json:"admin"`
	AppRole string `json:"app_role"`
}

var cfg config
var bg = context.Background()

func emit(step string, value map[string]interface{}) {
	value["step"] = step
	line, err := json.Marshal(value)
	if err != nil {
		line, _ = json.Marshal(map[string]interface{}{"step": step, "unprintable": err.Error()})
	}
	fmt.Println(string(line))
}

func attempt(step string, action func() (interface{}, error)) {
	result, err := action()
	if err != nil {
		emit(step, map[string]interface{}{"error": failure(err), "partial": result})
		return
	}
	emit(step, map[string]interface{}{"result": result})
}

func outcome(value interface{}, err error) interface{} {
	if err != nil {
		return map[string]interface{}{"error": failure(err)}
	}
	return value
}
