// placeholder: the dist module is being written
